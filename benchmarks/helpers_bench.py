from corexp.config import RESOURCES_DIR, compose_config
from corexp.job import Job


def compose(overrides):
    """The Job of `python -m corexp <overrides>` (built at the door: typed components)."""
    return Job.from_config(compose_config(list(overrides)))


def sample_dir():
    return RESOURCES_DIR / "scifact_sample"
