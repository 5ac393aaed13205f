"""`python -m corexp [overrides]`: the Hydra entry point; bad input ends in one line, not a traceback.

Overrides are checked against corexp.validation's table before Hydra composes anything; the composed config is
checked again (values from experiment files) before any model or data is loaded. `dry_run=true` prints the plan.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from corexp.config import config_dir
from corexp.errors import CorexpError

log = logging.getLogger("corexp")


def main() -> None:
    """Console entry: one line for an invalid setting on the command line, then Hydra."""
    from corexp.validation import check_overrides

    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"corexp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        from corexp.validation import validate

        validate(cfg)
        if cfg.get("dry_run"):
            from corexp.plan import job_plan

            print(json.dumps(job_plan(cfg), indent=1, ensure_ascii=False))
            return None
        from corexp.run import run_job

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
