"""`python -m corexp [overrides]`: the Hydra entry point; bad input ends in one line, not a traceback."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from corexp.config import config_dir
from corexp.errors import CorexpError

log = logging.getLogger("corexp")


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from corexp.run import run_job

    try:
        metrics = run_job(cfg)
    except CorexpError as err:
        if cfg.get("debug"):
            raise
        print(f"corexp: error: {err}", file=sys.stderr)
        if _is_multirun():
            raise  # the sweep marks this job failed and goes on
        sys.exit(2)
    return metrics.get("rerank.nDCG_at_10")


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


if __name__ == "__main__":
    main()
