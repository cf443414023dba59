"""Commands that read a finished run or a model directory: eval, sample, plot, export and import."""
