"""`python -m corexp [overrides]`: the Hydra entry point; every failure ends in one line, not a traceback.

Overrides are checked against the settings' declarations (corexp.settings) before Hydra composes anything; the composed
config is checked again (values from experiment files) when the job is built, before any model or data is loaded.
`dry_run=true` prints the plan; a finished job prints its summary (first stage vs re-ranked, p-value, run, UI command).

A failed job prints `corexp: error: <what and the fix>` and exits non-zero (2: bad input, 1: an internal error, with
a request to report it); `debug=true` shows the traceback instead. In a sweep every job runs, each failure is printed
as its own line, the sweep's parent run is closed as FAILED and the command exits 1 after a line that counts them.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from corexp.errors import CorexpError, one_line
from corexp.locations import config_dir
from corexp.tracking.tracker import Terminated

log = logging.getLogger("corexp")


def main() -> None:
    """Console entry: one line for an invalid setting on the command line, then Hydra."""
    from corexp import callbacks
    from corexp.config import normalize_overrides
    from corexp.validation import check_overrides

    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"corexp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = normalize_overrides(sys.argv[1:])  # a group's setting reaches the options that take it
    try:
        hydra_main()
    except KeyboardInterrupt:
        print("corexp: interrupted", file=sys.stderr)
        sys.exit(130)
    if callbacks.SWEEP_FAILURES:
        failed, total = callbacks.SWEEP_FAILURES
        print(f"corexp: error: {failed} of {total} jobs of the sweep failed (each one's reason is printed above and "
              "tagged `failure` on its run)", file=sys.stderr)
        sys.exit(1)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    from corexp import callbacks

    callbacks.record_job()
    if not cfg.get("debug"):  # MLflow logs a store's write error with two tracebacks before raising it; corexp says it in one line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        from corexp.job import Job

        job = Job.from_config(cfg)  # every setting checked once, components built, measures parsed
        if cfg.get("dry_run"):
            print(json.dumps(plan(job), indent=1, ensure_ascii=False, default=str))
            return None
        from corexp.pipeline.run import run_job

        summary = run_job(job)
    except Terminated as err:  # the run is FAILED with its reason already; the process stops, sweep or not
        if cfg.get("debug"):
            raise
        print(f"corexp: error: {err}", file=sys.stderr, flush=True)
        sys.exit(143)
    except Exception as err:
        return _failed(cfg, err)
    print(summary.text(), flush=True)
    return summary.rerank


def _failed(cfg: DictConfig, err: Exception) -> None:
    """One line for the failure; outside a sweep the process exits (2: bad input, 1: internal error), inside one the job
    is recorded as failed in the sweep folder and the sweep goes on (callbacks.MlflowSweepCallback counts it)."""
    from corexp import callbacks

    if cfg.get("debug"):
        raise err
    line = one_line(err)
    print(f"corexp: error: {line}", file=sys.stderr, flush=True)
    if callbacks.record_failure(line):
        return None
    sys.exit(2 if isinstance(err, CorexpError) else 1)


def plan(job: Any) -> dict[str, Any]:
    """The job's data set, queries, candidates, method, head count, truncation and detection: `dry_run=true` prints it."""
    from corexp.tracking import names

    ds = job.data.load()
    qids = job.data.queries(ds)
    detection = None
    if job.heads.needs_detection:
        det = job.detection
        if det.judged:  # the re-ranking prompts of judged queries (components/judged.py)
            detection = {"data": job.data.name if det.folds else det.name, "instances": "judged re-ranking prompts",
                         "queries": "the other folds' queries" if det.folds else det.num_queries or "every judged query",
                         "folds": det.folds}
        else:
            detection = {"data": det.name, "queries": det.num_queries, "negatives": det.num_negatives,
                         "positions": det.positions, "instances": det.num_queries * det.positions, "fold": det.fold,
                         "max_words": det.max_words if det.max_words is not None else job.prompt.max_words}
    return {
        "run_name": job.run_name(),
        "model": job.model.name,
        "dataset": job.data.name,
        "queries": len(qids),
        "first_stage": job.first_stage.name,
        "depth": int(job.first_stage.depth),
        "method": names.method_label(job.run_key()),
        "heads": {"name": job.heads.name, **job.heads.settings()},
        "tau": job.heads.temperature(job.model.tau),
        "truncation": {"name": job.truncation.name, **job.truncation.settings()},
        "fusion": {"name": job.fusion.name, **job.fusion.settings()},
        "scoring": job.scoring.settings(),
        "prompt": job.prompt.name,
        "max_words": job.prompt.max_words,
        "doc_order": job.prompt.doc_order.name,
        "detection": detection,
        "dtype": job.model.dtype,
        "device": job.model.device,
        "ignored": list(job.ignored),
        "keys": dict(job.run_key().keys),
    }


if __name__ == "__main__":
    main()

