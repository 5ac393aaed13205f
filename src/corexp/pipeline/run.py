"""One job: data -> first stage -> head selection -> (truncated) model -> re-rank -> evaluate -> MLflow.

Each step takes and returns typed objects: `load_eval_data` -> `EvalData`, `select_heads` -> `HeadSelection`,
`rerank_queries` -> `Reranking`, assembled into a `JobResult` by `rerank_pipeline` (no MLflow calls). `run_job` checks,
skips finished identities, opens the MLflow run and has `tracking.log_job` record what was computed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from corexp.components.detection import detection_table
from corexp.components.first_stage import Candidates
from corexp.components.heads import HeadSelection, SelectionContext
from corexp.data.datasets import IRDataset, load_dataset, select_queries
from corexp.data.evaluation import Evaluation, evaluate
from corexp.engine.memory import PeakMemory
from corexp.engine.models import ModelInfo, load_model, load_tokenizer, model_info, resolve_device
from corexp.engine.prompt import PromptBuilder, for_detection
from corexp.engine.readout_cache import ReadoutCache
from corexp.engine.reranker import AttentionReranker, QueryStats
from corexp.engine.scoring import rank, trec_scores
from corexp.errors import CorexpError, one_line
from corexp.job import Job
from corexp.tracking import store as tracking

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class EvalData:
    """The evaluation queries and their first-stage candidates, evaluated."""

    ds: IRDataset
    qids: list[str]
    candidates: Candidates
    evaluation: Evaluation


@dataclass
class Reranking:
    """The re-ranked run, the raw score rows and each query's statistics."""

    run: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    stats: list[QueryStats] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # queries that ran a forward (a read-out cache hit runs none)


@dataclass
class JobResult:
    """Everything a job computed; tracking.log_job turns it into MLflow params, metrics and artifacts."""

    data: EvalData
    selection: HeadSelection
    model: ModelInfo
    kept_layers: int
    model_loaded: str  # the loaded model's description (gguf:<file>, hf:<id>, local:<folder>)
    reranking: Reranking
    evaluation: Evaluation
    peak_memory_mb: float = 0.0
    wall_time_s: float = 0.0  # the whole job: data, first stage, detection, model loading, re-ranking
    cpu_time_s: float = 0.0  # CPU seconds of this process over the same span (all threads)


def load_eval_data(job: Job) -> EvalData:
    cfg = job.cfg
    ds = load_dataset(cfg.data)
    qids = select_queries(ds, cfg.data.max_queries, cfg.data.get("query_ids"))
    cands = job.first_stage.candidates(ds, qids, Path(cfg.paths.cache_dir), cfg.progress, bool(cfg.data.drop_self_hits))
    return EvalData(ds, qids, cands, evaluate(ds.qrels, cands.top, job.measures))


def model_key(job: Job, info: ModelInfo) -> str:
    """The model's part of the detection cache key (its files' identity and precision), without loading its weights."""
    return f"{job.cfg.model.name}:{info.description}:{info.sha256}:{job.cfg.model.dtype}"


def detection(job: Job, eval_qids: list[str], info: ModelInfo):
    """This job's detection table (METHOD.md §4): keyed by the tokenizer's prompts, the model loaded only to compute it."""
    cfg = job.cfg
    cache = Path(cfg.paths.cache_dir)
    prompt_cfg = for_detection(job.prompt_cfg, cfg.detection.get("max_words"))
    builder = PromptBuilder(load_tokenizer(cfg.model, cache), prompt_cfg, cfg.model.template)

    def reranker() -> AttentionReranker:
        return AttentionReranker(load_model(cfg.model, cache), prompt_cfg, None, cfg.model.template)

    return detection_table(cfg.detection, builder, job.first_stage, set(eval_qids), cache, model_key(job, info),
                           reranker, cfg.progress)


def select_heads(job: Job, eval_qids: list[str], info: ModelInfo) -> tuple[HeadSelection, int]:
    """The heads of this run and the layers to load (re-selecting where a truncation cut selected heads)."""
    ctx = SelectionContext(info.n_layers, info.n_heads, job.model_tau, dict(job.cfg.model.get("published_heads") or {}),
                           detection(job, eval_qids, info) if job.heads.needs_detection else None)
    selection = job.heads.select(ctx)
    if selection.heads is not None:
        bad = [f"{l}-{h}" for l, h in selection.heads if not (0 <= l < info.n_layers and 0 <= h < info.n_heads)]
        if bad:
            raise CorexpError(f"heads {bad[:3]} are outside the model ({info.n_layers} layers x {info.n_heads} heads)")
    keep = job.truncation.keep(info.n_layers, selection.deepest_layer)
    selection2 = job.heads.reselect(selection, keep, ctx)
    if selection2.reselected and not selection.reselected:
        log.warning("truncation to %d layers removed selected heads; re-selected among kept layers", keep)
    return selection2, keep


def rerank_queries(job: Job, data: EvalData, rr: AttentionReranker) -> Reranking:
    out = Reranking()
    cfg = job.cfg
    for qid in tqdm(data.qids, desc=f"re-rank {cfg.data.name} ({cfg.model.name})", disable=not cfg.progress):
        cand = data.candidates.top[qid]
        if not cand:
            out.run[qid] = []
            continue
        ids = [d for d, _ in cand]
        found = data.ds.docs.get_many(ids)
        missing = [d for d in ids if d not in found]
        if missing:
            raise CorexpError(f"first-stage run lists document '{missing[0]}' for query {qid}, but the corpus has no such id")
        t0 = time.perf_counter()
        scored = rr.score(data.ds.queries[qid], [found[d] for d in ids], qid)
        if not scored.stats.cached:
            out.latencies.append(time.perf_counter() - t0)
        out.stats.append(scored.stats)
        final = job.fusion.fuse(ids, scored.scores, [s for _, s in cand])
        out.run[qid] = trec_scores(rank(ids, final))
        out.rows += [{"query_id": qid, "doc_id": d, "first_stage_rank": i + 1, "attention_score": scored.scores[i],
                      "final_score": final[i]} for i, d in enumerate(ids)]
    return out


def rerank_pipeline(job: Job, info: ModelInfo, on_data: Any = None) -> JobResult:
    """Data, first stage, heads, truncated model, re-ranking and evaluation; no MLflow calls.

    on_data(EvalData) is called once the evaluation data and the first stage are known (tracking tags them early, so
    that a run that fails later still says what it was run on).
    """
    cfg = job.cfg
    data = load_eval_data(job)
    if on_data is not None:
        on_data(data)
    selection, keep = select_heads(job, data.qids, info)
    with PeakMemory(str(resolve_device(cfg.model.device))) as memory:  # truncated model + re-ranking working memory
        lm = load_model(cfg.model, Path(cfg.paths.cache_dir), keep_layers=keep)
        cache = ReadoutCache(cfg.paths.cache_dir, f"{lm.source}:{lm.sha256}:{lm.dtype}:{lm.device.type}") \
            if cfg.readout_cache else None
        rr = AttentionReranker(lm, job.prompt_cfg, selection.heads, cfg.model.template, readout_cache=cache)
        reranking = rerank_queries(job, data, rr)
    return JobResult(data, selection, info, lm.kept_layers, lm.source, reranking,
                     evaluate(data.ds.qrels, reranking.run, job.measures), memory.peak_mb)


@dataclass(frozen=True)
class JobSummary:
    """What a person wants to see at the end of a job (the CLI prints `text()`; `run_job` returns it)."""

    run_name: str
    run_id: str
    measure: str
    first_stage: float
    rerank: float
    p_value: float | None  # paired t-test over queries, re-ranker vs first stage
    queries: int
    wall_time_s: float
    open_command: str
    metrics: dict[str, float]
    skipped: str = ""  # why the job did not compute (an identical FINISHED run)

    def text(self) -> str:
        lines = [f"corexp: {'skipped — ' + self.skipped if self.skipped else 'finished'}: {self.run_name}"]
        if self.first_stage == self.first_stage:  # not NaN
            diff = self.rerank - self.first_stage
            p = "n/a" if self.p_value is None else f"{self.p_value:.3g}"
            lines += [f"  {self.measure:<12} first stage {self.first_stage:.4f}   re-ranked {self.rerank:.4f}   "
                      f"difference {diff:+.4f} (paired t-test p = {p}, {self.queries} queries)"]
        lines += [f"  wall time {self.wall_time_s:.1f} s   run {self.run_id}", f"  open: {self.open_command}"]
        return "\n".join(lines)


def summarize(job: Job, run: Any, metrics: dict[str, float], per_query: Any = None, skipped: str = "") -> JobSummary:
    """The end-of-job summary of an MLflow run (the primary measure is the first of data.measures)."""
    from scipy.stats import ttest_rel

    from corexp.data.evaluation import safe_name

    measure = str(job.measures[0])
    fs = metrics.get(f"first_stage.{safe_name(job.measures[0])}", float("nan"))
    rr = metrics.get(f"rerank.{safe_name(job.measures[0])}", float("nan"))
    p = None
    if per_query is not None:
        (_, a), (_, b) = per_query
        qs = sorted(a)
        x, y = [a[q][measure] for q in qs], [b.get(q, {}).get(measure, 0.0) for q in qs]
        if len(qs) > 1 and x != y:
            p = float(ttest_rel(y, x).pvalue)
    return JobSummary(run.info.run_name, run.info.run_id, measure, fs, rr, p, int(metrics.get("queries", 0)),
                      float(metrics.get("wall_time_s", 0.0)),
                      tracking.open_command(str(job.cfg.tracking.uri), run.info.experiment_id, run.info.run_id),
                      dict(metrics), skipped)


def run_job(job: Job) -> JobSummary:
    """Run one validated job end to end (unless its identity already has a FINISHED run) and summarize it."""
    cfg = job.cfg
    seed_everything(int(cfg.seed))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for warning in job.ignored:
        log.warning(warning)
    info = model_info(cfg.model, Path(cfg.paths.cache_dir))  # the model's config only (offline/gated ids fail here)
    job.heads.check_dims(info.n_layers, info.n_heads)
    job.truncation.check_dims(info.n_layers)
    mlflow = tracking.setup(cfg)
    identity = tracking.job_identity(job)
    overrides = tracking.job_overrides()
    stale_after = float(cfg.tracking.stale_after_s)
    while True:
        stale = tracking.fail_stale_runs(mlflow, tracking.running_job_runs(mlflow, cfg.tracking.experiment), stale_after)
        if stale:  # any config's: a killed job's run must not stay RUNNING until its own config runs again
            log.warning("marked %d RUNNING run(s) FAILED: their processes are gone", stale)
        previous = tracking.find_runs(mlflow, cfg.tracking.experiment, identity.config_hash)
        same = [r for r in previous if r.data.tags.get("code_digest") == identity.code_digest]
        done = [r for r in same if r.info.status == "FINISHED"]
        if done and not cfg.force:
            run = done[0]
            log.info("skipping: run %s already FINISHED this config with this code (force=true reruns it)", run.info.run_id)
            return summarize(job, run, dict(run.data.metrics), skipped="the same config and code already FINISHED")
        older = [r for r in previous if r.info.status == "FINISHED" and r.data.tags.get("code_digest") != identity.code_digest]
        if older and not done:
            log.info("rerunning: the code changed since run %s of this config (code %s -> %s)", older[0].info.run_id,
                     older[0].data.tags.get("code_digest", "none"), identity.code_digest)
        active = tracking.start_run(mlflow, job, identity, overrides)
        if cfg.force:
            break
        now = [r for r in tracking.find_runs(mlflow, cfg.tracking.experiment, identity.config_hash)
               if r.data.tags.get("code_digest") == identity.code_digest]
        running = [r for r in now if r.info.status == "RUNNING"
                   and (r.info.run_id == active.info.run_id or tracking.run_is_alive(r, stale_after))]
        first = tracking.earliest(running)
        finished_meanwhile = any(r.info.status == "FINISHED" for r in now)
        if first.info.run_id == active.info.run_id and not finished_meanwhile:
            break
        mlflow.end_run(status="KILLED")
        mlflow.MlflowClient().delete_run(active.info.run_id)
        if finished_meanwhile:  # another process finished it between the check above and this run's start
            continue
        log.info("run %s of the same config and code is running (host %s, pid %s): waiting for it, then skipping",
                 first.info.run_id, first.data.tags.get("host"), first.data.tags.get("pid"))
        tracking.wait_for(mlflow, first.info.run_id, stale_after)
    try:
        with tracking.heartbeat(mlflow, active.info.run_id), tracking.terminate_as_exception():
            wall, cpu = time.perf_counter(), time.process_time()
            result = rerank_pipeline(job, info, on_data=lambda data: tracking.log_data(mlflow, job, data))
            result.wall_time_s, result.cpu_time_s = time.perf_counter() - wall, time.process_time() - cpu
            metrics = tracking.log_job(mlflow, job, result, out_dir)
    except BaseException as err:
        with contextlib.suppress(Exception):  # the reason, where the UI shows it; never hides the failure itself
            mlflow.set_tag("failure", one_line(err)[:4000])
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
    summary = summarize(job, active, metrics, (result.data.evaluation, result.evaluation))
    log.info("run %s (%s): %s", active.info.run_name, active.info.run_id,
             {k: round(v, 4) for k, v in metrics.items() if "." in k and not k.startswith("heads.")})
    return summary
