from hydra import compose as _compose
from hydra import initialize_config_dir

from corexp.config import RESOURCES_DIR, config_dir


def compose(overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return _compose("config", overrides=list(overrides))


def sample_dir():
    return RESOURCES_DIR / "scifact_sample"
