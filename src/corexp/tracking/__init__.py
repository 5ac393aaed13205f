"""Tracking: the MLflow store, run identity and liveness, the sweep callback, the figures a run logs."""
