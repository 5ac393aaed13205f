from hydra import compose, initialize_config_dir

from corexp.config import config_dir


def compose_cfg(overrides=(), return_hydra_config=False):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
