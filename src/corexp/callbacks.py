"""Hydra callback: one MLflow parent run per sweep; its id is written to the sweep folder for every job to read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from corexp.tracking import PARENT_FILE


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from corexp import tracking

        mlflow = tracking.setup(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(config.hydra.overrides.task)
        run = mlflow.MlflowClient().create_run(
            mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id,
            run_name=f"sweep {sweep_dir.name}", tags={"sweep": "parent", "overrides": overrides, "sweep_dir": str(sweep_dir)},
        )
        (sweep_dir / PARENT_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from corexp import tracking

        path = Path(config.hydra.sweep.dir) / PARENT_FILE
        if path.is_file():
            mlflow = tracking.setup(config)
            mlflow.MlflowClient().set_terminated(path.read_text().strip(), status="FINISHED")
