"""A run on disk and the machine under it: the workdir, checkpoints, metrics, validation, the time
budget, device peaks, host settings, signals."""
