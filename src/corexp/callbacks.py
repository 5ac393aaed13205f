"""Hydra callback: one MLflow parent run per sweep; its id is written to the sweep folder for every job to read.

A job that fails inside a sweep records its one-line reason in `<sweep folder>/failed/<parent run id>/` (any launcher:
the jobs may run in other processes or on other nodes) and the sweep goes on; at the end the callback closes the parent
run as FAILED with a `failure` tag counting them, or FINISHED, and leaves the count in SWEEP_FAILURES for the CLI's exit
code. A sweep folder used before (an explicit `hydra.sweep.dir`), or by two sweeps at once, stays each sweep's own: the
parent's id also travels to the jobs in the COREXP_SWEEP_PARENT environment variable (launchers pass the environment
on), failures are kept per parent, and each sweep closes the parent it opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PARENT_FILE = "mlflow_parent_run_id"
SWEPT_FILE = "swept_keys.json"
FAILED_DIR = "failed"
JOBS_DIR = "jobs"
PARENT_ENV = "COREXP_SWEEP_PARENT"
SWEEP_FAILURES: tuple[int, int] | None = None  # (failed jobs, jobs) of the last sweep this process ran


def _sweep_folder(kind: str) -> tuple[Path, Any] | None:
    """<sweep folder>/<kind>/<parent run id> of this process's sweep job, and Hydra's config (None: not in a sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:
        return None
    if hc.mode.name != "MULTIRUN":
        return None
    folder = Path(hc.sweep.dir) / kind / str(sweep_parent(Path(hc.sweep.dir), "unknown"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder, hc


def record_job() -> None:
    """In a sweep, mark this job as one of its sweep's (the parent counts its own jobs in a reused folder)."""
    where = _sweep_folder(JOBS_DIR)
    if where is not None:
        (where[0] / str(where[1].job.num)).touch()


def record_failure(line: str) -> bool:
    """In a sweep, write the failed job's one-line reason into the sweep folder and return True; outside one, False."""
    where = _sweep_folder(FAILED_DIR)
    if where is None:
        return False
    folder, hc = where
    (folder / f"{hc.job.num}.txt").write_text(f"{' '.join(hc.overrides.task)}\n{line}\n")
    return True


def sweep_parent(sweep_dir: Path, default: str | None = None) -> str | None:
    """The parent run of the sweep this process belongs to: the environment's (set by the sweep's own callback), else
    the sweep folder's file (a launcher that did not pass the environment on)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    path = sweep_dir / PARENT_FILE
    return path.read_text().strip() if path.is_file() else default


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
    def __init__(self) -> None:
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracker = _tracker(config)
        tracker.fail_killed_sweeps()
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(config.hydra.overrides.task)
        keys = swept_keys(config)
        swept = [o.lstrip("+") for o in config.hydra.overrides.task if o.split("=", 1)[0].lstrip("+~").replace("/", ".") in keys]
        params = config.hydra.get("sweeper", {}).get("params") or {}
        swept += [f"{k}={v}" for k, v in params.items() if k in keys and not any(s.startswith(f"{k}=") for s in swept)]
        self.run_id = tracker.start_parent(" · ".join(["sweep", *swept, f"{sweep_dir.parent.name} {sweep_dir.name}"]),
                                           {"overrides": overrides, "sweep_dir": str(sweep_dir)})
        os.environ[PARENT_ENV] = self.run_id
        (sweep_dir / PARENT_FILE).write_text(self.run_id)
        (sweep_dir / SWEPT_FILE).write_text(json.dumps(keys))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_FAILURES

        sweep_dir = Path(config.hydra.sweep.dir)
        run_id = self.run_id or sweep_parent(sweep_dir)
        own = sweep_dir / FAILED_DIR / str(run_id)
        failed = sorted(own.glob("*.txt")) if own.is_dir() else []
        mine = sweep_dir / JOBS_DIR / str(run_id)  # this sweep's jobs (a reused folder keeps older sweeps' too)
        jobs = sum(1 for _ in mine.iterdir()) if mine.is_dir() else 0
        SWEEP_FAILURES = (len(failed), max(jobs, len(failed))) if failed else None
        if os.environ.get(PARENT_ENV) == run_id:
            del os.environ[PARENT_ENV]
        if run_id:
            reason = f"{len(failed)} of {max(jobs, len(failed))} jobs failed: " + \
                "; ".join(p.read_text().splitlines()[-1][:200] for p in failed[:5]) if failed else ""
            _tracker(config).end(run_id, reason)


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


@dataclass(frozen=True)
class RunContext:
    """Where a job runs inside Hydra: its overrides, the settings its sweep varies, the sweep's parent run, its folder."""

    overrides: tuple[str, ...] = ()
    swept: tuple[str, ...] = ()
    parent_run_id: str | None = None
    output_dir: str | None = None

    @classmethod
    def current(cls) -> RunContext:
        from hydra.core.hydra_config import HydraConfig

        try:
            hc = HydraConfig.get()
        except ValueError:
            return cls()
        parent, swept = None, ()
        if hc.mode.name == "MULTIRUN":
            folder = Path(hc.sweep.dir)
            parent = sweep_parent(folder)
            swept = tuple(json.loads((folder / SWEPT_FILE).read_text())) if (folder / SWEPT_FILE).is_file() else ()
        return cls(tuple(hc.overrides.task), swept, parent, hc.runtime.output_dir)
