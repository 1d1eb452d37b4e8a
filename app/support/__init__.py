"""Helpers of a run that every part of ``app/`` may use: data and output folders, checkpoints,
traffic metering of the grid, Flower's polling tuned for small federations."""
