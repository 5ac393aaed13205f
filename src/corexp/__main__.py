"""`python -m corexp [overrides]`: the Hydra entry point; bad input ends in one line, not a traceback.

Overrides are checked against the settings' declarations (corexp.settings) before Hydra composes anything; the composed
config is checked again (values from experiment files) when the job is built, before any model or data is loaded.
`dry_run=true` prints the plan; a finished job prints its summary (first stage vs re-ranked, p-value, run, UI command).
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
    from corexp.components import normalize_overrides
    from corexp.validation import check_overrides

    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"corexp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = normalize_overrides(sys.argv[1:])  # a group's setting reaches the options that take it
    hydra_main()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        from corexp.job import Job

        job = Job.from_config(cfg)  # every setting checked once, components built, measures parsed
        if cfg.get("dry_run"):
            print(json.dumps(job.plan(), indent=1, ensure_ascii=False, default=str))
            return None
        from corexp.run import run_job

        summary = run_job(job)
    except CorexpError as err:
        if cfg.get("debug"):
            raise
        print(f"corexp: error: {err}", file=sys.stderr)
        if _is_multirun():
            raise  # the sweep marks this job failed and goes on
        sys.exit(2)
    print(summary.text(), flush=True)
    return summary.metrics.get("rerank.nDCG_at_10")


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


if __name__ == "__main__":
    main()
