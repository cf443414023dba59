"""Research: sweeps trained as one program, their stability metrics and their report."""
