"""MLflow tracking: one store, an experiment per study, run identity, flattened params, safe metric names, artifacts.

A run's identity is what it computes: the job's resolved config (corexp.job.Job.identity) *and* a digest of the code
that computes results (the package's source files and the versions of the libraries that change numbers). A FINISHED
run of the same identity is skipped; one of the same config but other code is rerun, and the reason is said in one
line. A RUNNING run is failed only when its process is provably gone (same host and no such pid, or no heartbeat for
`tracking.stale_after_s` on another host); two processes given the same identity at once agree on the earliest run,
and the other waits for it and then skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
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
        _check_server(uri)
    lock = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):  # jobs starting at once on a new store would create its tables concurrently
        from corexp.files import file_lock

        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CorexpError(f"tracking.uri={uri}: cannot create the store's folder {db.parent} ({err.strerror or err}); "
                              "choose a writable path (sqlite:////absolute/path/mlflow.db)") from None
        lock = file_lock(db.parent / f".{db.name}.init.lock")
    with lock:
        return _open_experiment(mlflow, cfg, uri)


def _check_server(uri: str, attempts: int = 3, timeout_s: float = 10.0) -> None:
    """The server answers /health. A refused connection fails at once; a server too busy to answer within timeout_s
    (its workers and the jobs sharing a loaded machine) gets `attempts` tries before the job gives up."""
    import urllib.error
    import urllib.request

    for attempt in range(attempts):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
            return
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            refused = isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower()
            if refused or attempt == attempts - 1:
                raise CorexpError(f"MLflow tracking URI '{uri}' is unreachable ({reason}); fix tracking.uri") from None
            time.sleep(1.0)


def _open_experiment(mlflow: Any, cfg: DictConfig, uri: str) -> Any:
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            art = cfg.tracking.get("artifact_location")
            art = art if not art or "://" in str(art) else Path(art).as_uri()
            try:
                mlflow.create_experiment(cfg.tracking.experiment, artifact_location=art, tags=experiment_tags())
            except Exception:
                if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
                    raise
        elif exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # experiments made by older versions
            for key, value in experiment_tags().items():
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
        mlflow.set_experiment(cfg.tracking.experiment)
    except Exception as err:
        raise CorexpError(f"MLflow tracking URI '{uri}' is unreachable ({type(err).__name__}); fix tracking.uri") from None
    return mlflow


# MLflow 3 opens an experiment on the GenAI traces overview unless its kind says it holds model-development runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The columns a re-ranking study compares, as a shared view of the runs table (open it with ?viewStateShareKey=corexp).
VIEW_KEY = "corexp"
VIEW_COLUMNS = ["attributes.`Dataset`", "metrics.`rerank.nDCG_at_10`", "metrics.`first_stage.nDCG_at_10`", "metrics.`latency_mean_s`",
                "metrics.`kept_layers`", "tags.`method`", "params.`heads.name`", "params.`data.name`"]


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


def log_config(mlflow: Any, job: Any) -> None:
    """Params: the resolved config with the components as their own settings (Job.params); the full config as YAML."""
    params = {k: v[:6000] for k, v in flatten(job.params()).items()}
    keys = list(params)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: params[k] for k in keys[i:i + 100]})
    mlflow.log_text(OmegaConf.to_yaml(job.cfg, resolve=True), "config.yaml")
    mlflow.set_tags({"git_commit": git_commit(), **{f"version.{k}": v for k, v in package_versions().items()}})


@dataclass(frozen=True)
class Identity:
    """config_hash: what the job computes (its config); code_digest: with which code."""

    config_hash: str
    code_digest: str


def config_hash(job: Any) -> str:
    from corexp.files import stable_key

    return stable_key(job.identity())


def job_identity(job: Any) -> Identity:
    from corexp.tracking.identity import code_digest

    return Identity(config_hash(job), code_digest())


# Overrides that say where a job reads or writes, not what it computes: left out of run names.
_NAME_NOISE = ("paths.", "tracking.", "hydra.", "progress", "debug", "force", "experiment", "seed")
_NAME_NOISE_SUFFIX = ("local_dir", ".path", "run_file", "cache_dir")


def run_name(mlflow: Any, job: Any, overrides: list[str]) -> str:
    """A readable name, unique in the experiment: `smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample`.

    It names what the job computes (Job.labels) plus any setting its sweep varies that the name would not otherwise
    show; an existing run of the same name (a forced rerun) gets ` #2`, ` #3`, ... Never drawn from the seeded RNG
    (seeding Python's random made MLflow's own random names collide).
    """
    cfg = job.cfg
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    swept = set(sweep_keys())
    varying = {}
    for item in overrides:
        key, _, value = item.partition("=")
        bare = key.lstrip("+~")
        if bare in swept and not bare.startswith(_NAME_NOISE) and not bare.endswith(_NAME_NOISE_SUFFIX):
            varying[bare] = value
    name = job.labels().run_name(varying)
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


HEARTBEAT_S = 30.0  # a RUNNING job refreshes its heartbeat tag this often


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def run_is_alive(run: Any, stale_after_s: float, now: float | None = None) -> bool:
    """A RUNNING run's process is alive unless provably gone: on this host, no process with its pid; elsewhere, no
    heartbeat (or start, for runs without one) for `stale_after_s` seconds."""
    tags = run.data.tags
    if tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit():
        return pid_alive(int(tags["pid"]))
    last = float(tags.get("heartbeat") or run.info.start_time / 1000)
    return (now or time.time()) - last < stale_after_s


def running_job_runs(mlflow: Any, experiment: str) -> list[Any]:
    """RUNNING job runs of the experiment (sweep parents are the sweep callback's to judge)."""
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'RUNNING'", output_format="list")
    return [r for r in runs if r.data.tags.get("sweep") != "parent"]


def fail_stale_runs(mlflow: Any, runs: list[Any], stale_after_s: float) -> int:
    """RUNNING runs whose process is provably gone (killed jobs): mark them FAILED so the store tells the truth."""
    client = mlflow.MlflowClient()
    stale = [r for r in runs if r.info.status == "RUNNING" and not run_is_alive(r, stale_after_s)]
    for r in stale:
        client.set_terminated(r.info.run_id, status="FAILED")
        client.set_tag(r.info.run_id, "failure", "stale RUNNING run: its process is gone")
    return len(stale)


@contextlib.contextmanager
def heartbeat(mlflow: Any, run_id: str, every_s: float = HEARTBEAT_S):
    """Refresh the run's `heartbeat` tag while the body runs (other hosts tell a live job from a killed one by it)."""
    stop = threading.Event()
    client = mlflow.MlflowClient()

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a missed beat only makes the run look older to other hosts
                client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


class Terminated(BaseException):
    """SIGTERM (a scheduler's cancel, `kill`): raised in the job so that its run is closed as FAILED with the reason."""

    def __str__(self) -> str:
        return "terminated by SIGTERM (a scheduler's cancel or `kill`)"


@contextlib.contextmanager
def terminate_as_exception():
    """While the body runs in the main thread, SIGTERM raises Terminated instead of ending the process unannounced."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for(mlflow: Any, run_id: str, stale_after_s: float, poll_s: float = 2.0) -> None:
    """Block while another process's run is RUNNING and alive (it is failed here once provably gone)."""
    client = mlflow.MlflowClient()
    while True:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING" or run.info.lifecycle_stage == "deleted":
            return
        if not run_is_alive(run, stale_after_s):
            fail_stale_runs(mlflow, [run], stale_after_s)
            return
        time.sleep(poll_s)


def open_command(uri: str, experiment_id: str, run_id: str) -> str:
    """How to look at a run in the MLflow UI."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then http://127.0.0.1:5000/{page}"


def earliest(runs: list[Any]) -> Any:
    """The run every process agrees computes an identity: the earliest started (ties: the smaller run id)."""
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id))


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


def start_run(mlflow: Any, job: Any, identity: Identity, overrides: list[str]) -> Any:
    """The job's MLflow run (a child of the sweep's parent run in a multirun), RUNNING, tagged with its identity,
    host, pid and a first heartbeat; the config is logged at once."""
    cfg = job.cfg
    tags = {"config_hash": identity.config_hash, "code_digest": identity.code_digest, "overrides": " ".join(overrides),
            "host": socket.gethostname(), "pid": str(os.getpid()), "heartbeat": f"{time.time():.0f}",
            **job.labels().as_tags()}
    active = mlflow.start_run(run_name=run_name(mlflow, job, overrides), parent_run_id=sweep_parent_id(cfg), tags=tags)
    log_config(mlflow, job)
    return active


def log_data(mlflow: Any, job: Any, data: Any) -> None:
    """Tags and an MLflow dataset input (name, digest, source): the runs table's Dataset column and filter."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    cfg, ds = job.cfg, data.ds
    mlflow.set_tags({"dataset": cfg.data.name, "first_stage": data.candidates.provenance})
    source = ds.meta.get("source", cfg.data.name)
    uri = source if "://" in source else ("https://ir-datasets.com/" + source.split("/")[0] + ".html"
                                           if not source.startswith("/") else Path(source).as_uri())
    digest = hashlib.sha256(ds.fingerprint.encode()).hexdigest()[:12]
    log_input(mlflow, MetaDataset(HTTPDatasetSource(uri), name=cfg.data.name, digest=digest))


def log_input(mlflow: Any, dataset: Any, attempts: int = 4) -> None:
    """mlflow.log_input, tolerating MLflow's race on a new data set: the tracking server checks whether the data set
    exists and then inserts it, so jobs that log the same new data set at once can get `UNIQUE constraint failed:
    datasets...` (seen in a 4-worker sweep against a server). Once one insert has won, the data set exists and a retry
    only links it to the run."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context="evaluation")
            return
        except Exception as err:
            if "UNIQUE constraint failed: datasets" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_job(mlflow: Any, job: Any, res: Any, out_dir: Path) -> dict[str, float]:
    """Metrics, head artifacts, TREC runs and per-query tables of one finished job."""
    import numpy as np
    import pandas as pd
    import torch

    from corexp.data.datasets import write_trec_run
    from corexp.data.evaluation import safe_name

    sel = res.selection
    if sel.reselected:
        mlflow.set_tag("heads_reselected", "true")
    mlflow.set_tags({"model_source": res.model_loaded, "model_sha256": res.model.sha256 or "n/a"})
    log_heads(mlflow, job, res, out_dir)
    fs, rr = res.data.evaluation, res.evaluation
    metrics: dict[str, float] = {}
    names = {}
    for prefix, means in (("first_stage", fs.means), ("rerank", rr.means)):
        for m, v in means.items():
            names[f"{prefix}.{m}"] = f"{prefix}.{safe_name(m)}"
            metrics[f"{prefix}.{safe_name(m)}"] = v
    stats, lat = res.reranking.stats, np.array(res.reranking.latencies)
    if lat.size:
        metrics.update({"latency_mean_s": float(lat.mean()), "latency_p50_s": float(np.percentile(lat, 50)),
                        "latency_p95_s": float(np.percentile(lat, 95))})
    if stats:
        metrics.update({"prompt_tokens_mean": float(np.mean([s.prompt_tokens for s in stats])),
                        "readout_cache_hits": float(sum(s.cached for s in stats)),
                        "forward_passes_mean": float(np.mean([len(s.pass_tokens) for s in stats])),
                        "queries": float(len(res.data.qids)), "dropped_candidates": float(sum(s.dropped_docs for s in stats)),
                        "span_mismatches": float(sum(s.span_mismatches for s in stats)), "kept_layers": float(res.kept_layers),
                        "peak_memory_mb": float(res.peak_memory_mb),  # this job's model + re-ranking, above its start
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        if torch.cuda.is_available():
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    metrics.update({"wall_time_s": float(res.wall_time_s), "cpu_time_s": float(res.cpu_time_s)})
    if res.model.parameters:
        metrics["model_parameters"] = float(res.model.parameters)
    mlflow.log_metrics(metrics)
    write_trec_run(res.reranking.run, out_dir / "rerank.trec", f"corexp-{job.heads.name}")
    write_trec_run(res.data.candidates.top, out_dir / "first_stage.trec", res.data.candidates.provenance)
    pq = pd.DataFrame([{"query_id": q, **{f"first_stage.{m}": fs.per_query[q][m] for m in fs.per_query[q]},
                        **{f"rerank.{m}": rr.per_query.get(q, {}).get(m, 0.0) for m in fs.per_query[q]}}
                       for q in sorted(fs.per_query)])
    pq.to_csv(out_dir / "per_query.csv", index=False)
    pd.DataFrame(res.reranking.rows).to_csv(out_dir / "scores.csv", index=False)
    (out_dir / "metric_names.json").write_text(json.dumps(names, indent=1))
    for f in ("rerank.trec", "first_stage.trec", "per_query.csv", "scores.csv", "metric_names.json"):
        mlflow.log_artifact(str(out_dir / f))
    return metrics


def log_heads(mlflow: Any, job: Any, res: Any, out_dir: Path) -> None:
    import pandas as pd

    from corexp.components import heads as H
    from corexp.tracking.figures import heads_histogram, score_heatmap

    sel, n_layers, n_heads = res.selection, res.model.n_layers, res.model.n_heads
    if sel.heads is None:
        mlflow.log_param("selected_heads", "all")
        return
    heads = sel.heads
    mlflow.log_param("selected_heads", H.format_heads(heads))
    mlflow.log_metrics({f"heads.{k}": v for k, v in H.layer_stats(heads, n_layers).items()})
    if sel.jaccard_core_qrhead is not None:  # overlap of the two metrics' top-k on the same detection data
        mlflow.log_metric("heads.jaccard_core_vs_qrhead", sel.jaccard_core_qrhead)
    title = f"{job.cfg.model.name} {job.heads.name} top-{len(heads)}"
    mlflow.log_artifact(str(heads_histogram(heads, n_layers, out_dir / "heads_per_layer.png", title)))
    scores = sel.scores
    selected = set(heads)
    table = [{"layer": l, "head": h, "score": float(scores[l, h]), "selected": (l, h) in selected}
             for l in range(n_layers) for h in range(n_heads)] if scores is not None else \
        [{"layer": l, "head": h, "score": None, "selected": True} for l, h in heads]
    pd.DataFrame(table).to_csv(out_dir / "head_scores.csv", index=False)
    mlflow.log_artifact(str(out_dir / "head_scores.csv"))
    if scores is not None:
        mlflow.log_artifact(str(score_heatmap(scores, heads, out_dir / "head_scores.png", title)))
        detail = [{"layer": l, "head": h, "score": float(scores[l, h])} for l, h in heads]
        mlflow.log_dict({"metric": sel.metric, "tau": sel.tau, "instances": sel.instances, "heads": detail},
                        "selected_heads.json")
