"""Experiment tracking: MLflow runs for every job."""
