"""Reporting above the compute path: paper-style tables from the MLflow store (`python -m corexp.report`)."""
