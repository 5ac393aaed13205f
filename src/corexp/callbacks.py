"""Hydra callback: one MLflow parent run per sweep; its id is written to the sweep folder for every job to read.

A job that fails inside a sweep records its one-line reason in `<sweep folder>/failed/` (any launcher: the jobs may run
in other processes or on other nodes) and the sweep goes on; at the end the callback closes the parent run as FAILED
with a `failure` tag counting them, or FINISHED, and leaves the count in SWEEP_FAILURES for the CLI's exit code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from corexp.tracking.liveness import ProcessId, is_alive

PARENT_FILE = "mlflow_parent_run_id"
SWEPT_FILE = "swept_keys.json"
FAILED_DIR = "failed"
SWEEP_FAILURES: tuple[int, int] | None = None  # (failed jobs, jobs) of the last sweep this process ran


def record_failure(line: str) -> bool:
    """In a sweep, write the failed job's one-line reason into the sweep folder and return True; outside one, False."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:
        return False
    if hc.mode.name != "MULTIRUN":
        return False
    folder = Path(hc.sweep.dir) / FAILED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{hc.job.num}.txt").write_text(f"{' '.join(hc.overrides.task)}\n{line}\n")
    return True


def _tracker(config: DictConfig) -> Any:
    """The sweep's tracker (the tracking group built as a job builds it); one line and exit 2 when it cannot open."""
    import sys

    from corexp.config import build
    from corexp.errors import CorexpError

    try:
        return build(config.tracking, "tracking").component.open()
    except CorexpError as err:  # before any job: the sweep cannot log anywhere
        print(f"corexp: error: {err}", file=sys.stderr)
        sys.exit(2)


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracker = _tracker(config)
        fail_killed_sweeps(tracker)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(config.hydra.overrides.task)
        keys = swept_keys(config)
        swept = [o.lstrip("+") for o in config.hydra.overrides.task if o.split("=", 1)[0].lstrip("+~").replace("/", ".") in keys]
        params = config.hydra.get("sweeper", {}).get("params") or {}
        swept += [f"{k}={v}" for k, v in params.items() if k in keys and not any(s.startswith(f"{k}=") for s in swept)]
        run = tracker.client.create_run(
            tracker.experiment_id, run_name=" · ".join(["sweep", *swept, f"{sweep_dir.parent.name} {sweep_dir.name}"]),
            tags={"sweep": "parent", "overrides": overrides, "sweep_dir": str(sweep_dir),
                  **{f"sweep_{k}": v for k, v in ProcessId.current().tags().items()}, "heartbeat": f"{time.time():.0f}"},
        )
        (sweep_dir / PARENT_FILE).write_text(run.info.run_id)
        (sweep_dir / SWEPT_FILE).write_text(json.dumps(keys))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_FAILURES

        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sorted((sweep_dir / FAILED_DIR).glob("*.txt")) if (sweep_dir / FAILED_DIR).is_dir() else []
        jobs = sum(1 for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
        SWEEP_FAILURES = (len(failed), max(jobs, len(failed))) if failed else None
        path = sweep_dir / PARENT_FILE
        if path.is_file():
            tracker = _tracker(config)
            run_id = path.read_text().strip()
            if failed:
                tracker.client.set_tag(run_id, "failure", f"{len(failed)} of {max(jobs, len(failed))} jobs failed: " +
                                       "; ".join(p.read_text().splitlines()[-1][:200] for p in failed[:5]))
            tracker.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def swept_keys(config: DictConfig) -> list[str]:
    """The settings a sweep varies (command-line choice/range sweeps and hydra.sweeper.params of experiment files):
    the parts of a run name that tell its jobs apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        keys |= {o.key_or_group.lstrip("+~").replace("/", ".") for o in parsed if o.is_sweep_override()}
    except Exception:
        pass
    params = config.hydra.get("sweeper", {}).get("params") or {}
    keys |= {k for k, v in params.items() if "," in str(v) or str(v).startswith(("range(", "choice("))}
    return sorted(keys)


def fail_killed_sweeps(tracker: Any) -> int:
    """Parent runs left RUNNING by a sweep whose process is provably gone (killed): FAILED, with the reason. A sweep
    running elsewhere or still alive is left alone (corexp.tracking.liveness); children are each job's to judge."""
    stale = 0
    for run in tracker.runs("tags.sweep = 'parent' and attributes.status = 'RUNNING'"):
        tags = {k[len("sweep_"):]: v for k, v in run.tags.items() if k.startswith("sweep_")}
        tags["heartbeat"] = run.tags.get("heartbeat", "")
        if not is_alive(tags, run.start_ms, float("inf"), here=tracker.here):  # no heartbeat rule for parents
            tracker.client.set_tag(run.run_id, "failure", "the sweep's process was killed before it ended")
            tracker.client.set_terminated(run.run_id, status="FAILED")
            stale += 1
    return stale
