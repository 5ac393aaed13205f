"""MLflow tracking: one store, an experiment per study, flattened params, safe metric names, artifacts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from corexp.errors import CorexpError

log = logging.getLogger(__name__)


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    items = cfg.items() if isinstance(cfg, dict) else []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


def setup(cfg: DictConfig) -> Any:
    """Point MLflow at the configured store and experiment; a clear error if the store is unreachable."""
    import mlflow

    uri = str(cfg.tracking.uri)
    if uri.startswith(("http://", "https://")):  # fail fast instead of MLflow's minutes of retries
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except (urllib.error.URLError, OSError) as err:
            raise CorexpError(f"MLflow tracking URI '{uri}' is unreachable ({getattr(err, 'reason', err)}); fix tracking.uri") from None
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            art = cfg.tracking.get("artifact_location")
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=Path(art).as_uri() if art else None)
        mlflow.set_experiment(cfg.tracking.experiment)
    except Exception as err:  # noqa: BLE001 - any backend failure means the store is unusable
        raise CorexpError(f"MLflow tracking URI '{uri}' is unreachable ({type(err).__name__}); fix tracking.uri") from None
    return mlflow


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("corexp", "torch", "transformers", "ir_datasets", "ir_measures", "bm25s", "mlflow", "hydra-core"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def log_config(mlflow: Any, cfg: DictConfig) -> None:
    container = OmegaConf.to_container(cfg, resolve=True)
    params = {k: v[:6000] for k, v in flatten(container).items()}
    keys = list(params)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: params[k] for k in keys[i:i + 100]})
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    mlflow.set_tags({"git_commit": git_commit(), **{f"version.{k}": v for k, v in package_versions().items()},
                     "hostname": os.uname().nodename})


def config_hash(cfg: DictConfig) -> str:
    """Identity of a job: the resolved config minus where it writes (paths, tracking, hydra, progress/debug)."""
    from corexp.cache import stable_key

    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("paths", "tracking", "hydra", "progress", "debug", "force"):
        container.pop(key, None)
    return stable_key(_drop_unused(container))


# Fields a head metric never reads: jobs that differ only in them compute the same thing, so a grid such as
# heads=all,core heads.k=4,8 runs ICR once (METHOD.md: ICR has no k; QRHead has no temperature).
_UNUSED_BY_METRIC = {
    "all": ("k", "tau", "seed"),
    "published": ("tau", "seed"),
    "random": ("tau",),
    "qrhead": ("tau", "seed"),
    "core": ("seed",),
}


def _drop_unused(container: dict[str, Any]) -> dict[str, Any]:
    heads = container.get("heads") or {}
    metric = heads.get("metric")
    for key in _UNUSED_BY_METRIC.get(metric, ()):
        heads.pop(key, None)
    if metric in ("all", "published", "random"):  # no detection run
        container.pop("detection", None)
    trunc = container.get("truncation")
    if isinstance(trunc, dict):
        if metric == "all" and trunc.get("mode") == "auto":
            trunc["mode"] = "none"  # auto keeps every layer when every head is used
        used = {"fraction": ("fraction",), "layers": ("layers",)}.get(trunc.get("mode"), ())
        for key in [k for k in trunc if k != "mode" and k not in used]:
            trunc.pop(key)
    return container


# Overrides that say where a job reads or writes, not what it computes: left out of run names.
_NAME_NOISE = ("paths.", "tracking.", "hydra.", "progress", "debug", "force", "experiment", "seed")
_NAME_NOISE_SUFFIX = ("local_dir", ".path", "run_file", "cache_dir")


def run_name(mlflow: Any, cfg: DictConfig, overrides: list[str]) -> str:
    """A readable name, unique in the experiment: `smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample`.

    It names what the job computes (labels.run_name) plus any overridden setting the name would not otherwise show;
    an existing run of the same name (a forced rerun) gets ` #2`, ` #3`, ... Never drawn from the seeded RNG.
    """
    from corexp.labels import run_name as describe

    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    varying = {}
    for item in overrides:
        key, _, value = item.partition("=")
        bare = key.lstrip("+~")
        if not bare.startswith(_NAME_NOISE) and not bare.endswith(_NAME_NOISE_SUFFIX):
            varying[bare] = value
    name = describe(flatten(OmegaConf.to_container(cfg, resolve=True)), varying)
    taken = {r.info.run_name for r in mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list",
                                                         filter_string=f"attributes.run_name LIKE '{_like(name)}%'")}
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name} #{n}"
    return unique


def _like(text: str) -> str:
    """A LIKE prefix pattern for `text` ('_' matches itself as a wildcard, so only quotes and '%' need care)."""
    return text.replace("'", "''").split("%")[0]


def find_runs(mlflow: Any, experiment: str, chash: str) -> list[Any]:
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.config_hash = '{chash}'",
                              output_format="list")


def fail_stale_runs(mlflow: Any, runs: list[Any]) -> int:
    """Runs left RUNNING by a killed job (same config): mark them FAILED so the store tells the truth."""
    client = mlflow.MlflowClient()
    stale = [r for r in runs if r.info.status == "RUNNING"]
    for r in stale:
        client.set_terminated(r.info.run_id, status="FAILED")
        client.set_tag(r.info.run_id, "failure", "stale RUNNING run of a killed job")
    return len(stale)


PARENT_FILE = "mlflow_parent_run_id"


def sweep_parent_id(cfg: DictConfig) -> str | None:
    """The sweep's parent run id, written by the multirun callback into the sweep folder (works across processes)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode.name != "MULTIRUN":
            return None
        path = Path(hc.sweep.dir) / PARENT_FILE
    except ValueError:
        return None
    return path.read_text().strip() if path.is_file() else None
