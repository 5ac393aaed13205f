"""MLflow tracking: one store, an experiment per study, flattened params, safe metric names, artifacts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from corexp.errors import CorexpError
from corexp.labels import truncation_mode
from corexp.validation import UNUSED_BY_METRIC

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
            art = art if not art or "://" in str(art) else Path(art).as_uri()
            try:
                mlflow.create_experiment(cfg.tracking.experiment, artifact_location=art, tags=experiment_tags())
            except Exception:  # noqa: BLE001 - a concurrent job created it first
                if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
                    raise
        elif exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # experiments made by older versions
            for key, value in experiment_tags().items():
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
        mlflow.set_experiment(cfg.tracking.experiment)
    except Exception as err:  # noqa: BLE001 - any backend failure means the store is unusable
        raise CorexpError(f"MLflow tracking URI '{uri}' is unreachable ({type(err).__name__}); fix tracking.uri") from None
    return mlflow


# MLflow 3 opens an experiment on the GenAI traces overview unless its kind says it holds model-development runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The columns a re-ranking study compares, as a shared view of the runs table (open it with ?viewStateShareKey=corexp).
VIEW_KEY = "corexp"
VIEW_COLUMNS = ["attributes.`Dataset`", "metrics.`rerank.nDCG_at_10`", "metrics.`first_stage.nDCG_at_10`", "metrics.`latency_mean_s`",
                "metrics.`kept_layers`", "params.`heads.metric`", "params.`heads.k`", "params.`data.name`"]


def experiment_tags() -> dict[str, str]:
    view = {"selectedColumns": VIEW_COLUMNS, "orderByKey": VIEW_COLUMNS[1], "orderByAsc": False}
    return {EXPERIMENT_KIND_TAG: "custom_model_development", f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}


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
    container.pop("paths", None)  # where a job reads and writes, not what it computes (config.yaml keeps them)
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
    for key in ("paths", "tracking", "hydra", "progress", "debug", "force", "dry_run", "readout_cache"):
        container.pop(key, None)
    return stable_key(_drop_unused(container))


def _drop_unused(container: dict[str, Any]) -> dict[str, Any]:
    heads = container.get("heads") or {}
    metric = heads.get("metric")
    for key in UNUSED_BY_METRIC.get(metric, ()):
        heads.pop(key, None)
    if metric in ("all", "published", "random"):  # no detection run
        container.pop("detection", None)
    first = container.get("first_stage")
    if isinstance(first, dict):  # retrieval settings of the other first stages
        source = first.get("source")
        unused = [] if source == "hybrid" else ["rrf_k"]
        if source not in ("dense", "hybrid"):
            unused += ["encoder", "chunk_size"]
        if source in ("dense",):
            unused += ["k1", "b", "method", "stemmer", "stopwords"]
        for key in unused:
            first.pop(key, None)
    trunc = container.get("truncation")
    if isinstance(trunc, dict):
        if "mode" in trunc:
            trunc["mode"] = truncation_mode(metric, trunc["mode"])
        used = {"fraction": ("fraction",), "layers": ("layers",)}.get(trunc.get("mode"), ())
        for key in [k for k in trunc if k != "mode" and k not in used]:
            trunc.pop(key)
    return container


# Overrides that say where a job reads or writes, not what it computes: left out of run names.
_NAME_NOISE = ("paths.", "tracking.", "hydra.", "progress", "debug", "force", "experiment", "seed")
_NAME_NOISE_SUFFIX = ("local_dir", ".path", "run_file", "cache_dir")


def run_name(mlflow: Any, cfg: DictConfig, overrides: list[str]) -> str:
    """A readable name, unique in the experiment: `smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample`.

    It names what the job computes (labels.run_name) plus any setting its sweep varies that the name would not
    otherwise show; an existing run of the same name (a forced rerun) gets ` #2`, ` #3`, ... Never drawn from the
    seeded RNG (seeding Python's random made MLflow's own random names collide).
    """
    from corexp.labels import run_name as describe

    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    swept = set(sweep_keys())
    varying = {}
    for item in overrides:
        key, _, value = item.partition("=")
        bare = key.lstrip("+~")
        if bare in swept and not bare.startswith(_NAME_NOISE) and not bare.endswith(_NAME_NOISE_SUFFIX):
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
SWEPT_FILE = "swept_keys.json"


def _sweep_file(name: str) -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode.name != "MULTIRUN":
            return None
        return Path(hc.sweep.dir) / name
    except ValueError:
        return None


def sweep_keys() -> list[str]:
    """Settings the current sweep varies (written by the multirun callback); [] outside a sweep."""
    path = _sweep_file(SWEPT_FILE)
    return json.loads(path.read_text()) if path is not None and path.is_file() else []


def sweep_parent_id(cfg: DictConfig) -> str | None:
    """The sweep's parent run id, written by the multirun callback into the sweep folder (works across processes)."""
    path = _sweep_file(PARENT_FILE)
    return path.read_text().strip() if path is not None and path.is_file() else None


def job_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job ([] outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@contextlib.contextmanager
def start_job_run(mlflow: Any, cfg: DictConfig, chash: str, overrides: list[str]):
    """The job's MLflow run (a child of the sweep's parent run in a multirun), with the config logged first."""
    with mlflow.start_run(run_name=run_name(mlflow, cfg, overrides), parent_run_id=sweep_parent_id(cfg),
                          tags={"config_hash": chash, "overrides": " ".join(overrides), "model": cfg.model.name,
                                "method": cfg.heads.metric, "dataset": cfg.data.name}) as active:
        log_config(mlflow, cfg)
        yield active


def log_data(mlflow: Any, cfg: DictConfig, ds: Any, first_stage_label: str) -> None:
    """Tags and an MLflow dataset input (name, digest, source): the runs table's Dataset column and filter."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.set_tags({"dataset": cfg.data.name, "first_stage": first_stage_label})
    source = ds.meta.get("source", cfg.data.name)
    uri = source if "://" in source else ("https://ir-datasets.com/" + source.split("/")[0] + ".html"
                                           if not source.startswith("/") else Path(source).as_uri())
    digest = hashlib.sha256(ds.fingerprint.encode()).hexdigest()[:12]
    mlflow.log_input(MetaDataset(HTTPDatasetSource(uri), name=cfg.data.name, digest=digest), context="evaluation")


def log_job(mlflow: Any, cfg: DictConfig, res: Any, out_dir: Path) -> dict[str, float]:
    """Metrics, head artifacts, TREC runs and per-query tables of one finished job."""
    import numpy as np
    import pandas as pd
    import torch

    from corexp.data import write_trec_run
    from corexp.evaluation import safe_name

    if res.heads_reselected:
        mlflow.set_tag("heads_reselected", "true")
    mlflow.set_tags({"model_source": res.model_source, "model_sha256": res.model_sha256 or "n/a"})
    log_heads(mlflow, res.heads, res.head_info, res.n_layers, res.n_heads, out_dir, cfg)
    (fs_means, fs_per_query), (rr_means, rr_per_query) = res.first_stage_eval, res.rerank_eval
    metrics: dict[str, float] = {}
    names = {}
    for prefix, means in (("first_stage", fs_means), ("rerank", rr_means)):
        for m, v in means.items():
            names[f"{prefix}.{m}"] = f"{prefix}.{safe_name(m)}"
            metrics[f"{prefix}.{safe_name(m)}"] = v
    if res.latencies:
        lat = np.array(res.latencies)
        metrics.update({"latency_mean_s": float(lat.mean()), "latency_p50_s": float(np.percentile(lat, 50)),
                        "latency_p95_s": float(np.percentile(lat, 95))})
    if res.prompt_tokens:
        metrics.update({"prompt_tokens_mean": float(np.mean(res.prompt_tokens)), "readout_cache_hits": float(res.cached_queries),
                        "forward_passes_mean": float(np.mean(res.forward_passes)),
                        "queries": float(len(res.qids)), "dropped_candidates": float(res.dropped),
                        "span_mismatches": float(res.span_mismatches), "kept_layers": float(res.kept_layers),
                        "peak_memory_mb": float(res.peak_memory_mb),  # this job's model + re-ranking, above its start
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        if torch.cuda.is_available():
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics.update({"wall_time_s": float(res.wall_time_s), "cpu_time_s": float(res.cpu_time_s)})
    mlflow.log_metrics(metrics)
    write_trec_run(res.reranked, out_dir / "rerank.trec", f"corexp-{cfg.heads.metric}")
    write_trec_run(res.candidates, out_dir / "first_stage.trec", res.first_stage_label)
    pq = pd.DataFrame([{"query_id": q, **{f"first_stage.{m}": fs_per_query[q][m] for m in fs_per_query[q]},
                        **{f"rerank.{m}": rr_per_query.get(q, {}).get(m, 0.0) for m in fs_per_query[q]}}
                       for q in sorted(fs_per_query)])
    pq.to_csv(out_dir / "per_query.csv", index=False)
    pd.DataFrame(res.raw_rows).to_csv(out_dir / "scores.csv", index=False)
    (out_dir / "metric_names.json").write_text(json.dumps(names, indent=1))
    for f in ("rerank.trec", "first_stage.trec", "per_query.csv", "scores.csv", "metric_names.json"):
        mlflow.log_artifact(str(out_dir / f))
    return metrics


def log_heads(mlflow: Any, heads, info: dict[str, Any], n_layers: int, n_heads: int, out_dir: Path, cfg: DictConfig) -> None:
    import pandas as pd

    from corexp import heads as H
    from corexp.plots import heads_histogram, score_heatmap

    if heads is None:
        mlflow.log_param("selected_heads", "all")
        return
    mlflow.log_param("selected_heads", H.format_heads(heads))
    mlflow.log_metrics({f"heads.{k}": v for k, v in H.layer_stats(heads, n_layers).items()})
    if "jaccard_core_qrhead" in info:  # overlap of the two metrics' top-k on the same detection data
        mlflow.log_metric("heads.jaccard_core_vs_qrhead", info["jaccard_core_qrhead"])
    title = f"{cfg.model.name} {cfg.heads.metric} top-{len(heads)}"
    mlflow.log_artifact(str(heads_histogram(heads, n_layers, out_dir / "heads_per_layer.png", title)))
    scores = info.get("scores")
    selected = set(heads)
    table = [{"layer": l, "head": h, "score": float(scores[l, h]), "selected": (l, h) in selected}
             for l in range(n_layers) for h in range(n_heads)] if scores is not None else \
        [{"layer": l, "head": h, "score": None, "selected": True} for l, h in heads]
    pd.DataFrame(table).to_csv(out_dir / "head_scores.csv", index=False)
    mlflow.log_artifact(str(out_dir / "head_scores.csv"))
    if scores is not None:
        mlflow.log_artifact(str(score_heatmap(scores, heads, out_dir / "head_scores.png", title)))
        sel = [{"layer": l, "head": h, "score": float(scores[l, h])} for l, h in heads]
        mlflow.log_dict({"metric": info["metric"], "tau": info.get("tau"), "instances": info.get("instances"), "heads": sel},
                        "selected_heads.json")
