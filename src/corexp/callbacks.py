"""Hydra callback: one MLflow parent run per sweep; its id is written to the sweep folder for every job to read."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from corexp.tracking import PARENT_FILE, SWEPT_FILE


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from corexp import tracking

        mlflow = tracking.setup(config)
        experiment_id = mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id
        fail_killed_sweeps(mlflow, experiment_id)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(config.hydra.overrides.task)
        keys = swept_keys(config)
        swept = [o for o in config.hydra.overrides.task if o.split("=", 1)[0].lstrip("+~") in keys]
        params = config.hydra.get("sweeper", {}).get("params") or {}
        swept += [f"{k}={v}" for k, v in params.items() if k in keys and not any(s.startswith(f"{k}=") for s in swept)]
        run = mlflow.MlflowClient().create_run(
            experiment_id, run_name=" · ".join(["sweep", *swept, f"{sweep_dir.parent.name} {sweep_dir.name}"]),
            tags={"sweep": "parent", "overrides": overrides, "sweep_dir": str(sweep_dir),
                  "sweep_host": socket.gethostname(), "sweep_pid": str(os.getpid())},
        )
        (sweep_dir / PARENT_FILE).write_text(run.info.run_id)
        (sweep_dir / SWEPT_FILE).write_text(json.dumps(keys))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from corexp import tracking

        path = Path(config.hydra.sweep.dir) / PARENT_FILE
        if path.is_file():
            mlflow = tracking.setup(config)
            mlflow.MlflowClient().set_terminated(path.read_text().strip(), status="FINISHED")


def swept_keys(config: DictConfig) -> list[str]:
    """The settings a sweep varies (command-line choice/range sweeps and hydra.sweeper.params of experiment files):
    the parts of a run name that tell its jobs apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        keys |= {o.key_or_group.lstrip("+~") for o in parsed if o.is_sweep_override()}
    except Exception:
        pass
    params = config.hydra.get("sweeper", {}).get("params") or {}
    keys |= {k for k, v in params.items() if "," in str(v) or str(v).startswith(("range(", "choice("))}
    return sorted(keys)


def fail_killed_sweeps(mlflow: Any, experiment_id: str) -> int:
    """Parent runs left RUNNING by a sweep whose process is gone from this host (killed): mark them FAILED.

    A sweep running elsewhere or still alive here is left alone; children are handled by each job's own check.
    """
    from corexp import tracking

    client = mlflow.MlflowClient()
    host, stale = socket.gethostname(), 0
    for run in client.search_runs([experiment_id], "tags.sweep = 'parent' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("sweep_host") == host and tags.get("sweep_pid", "").isdigit() and not tracking.pid_alive(int(tags["sweep_pid"])):
            client.set_terminated(run.info.run_id, status="FAILED")
            client.set_tag(run.info.run_id, "failure", "sweep process was killed before it ended")
            stale += 1
    return stale
