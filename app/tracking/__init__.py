"""Experiment trackers (``logger=tensorboard|mlflow``): their schemas and the per-round logging."""
