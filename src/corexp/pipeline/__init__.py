"""The pipeline: one job from its typed components to a logged result."""
