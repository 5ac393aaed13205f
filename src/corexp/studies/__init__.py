"""Studies above the compute path: the scaling study and the head atlas, read from the MLflow store."""
