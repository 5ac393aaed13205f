"""One job: data -> first stage -> heads -> (truncated) model -> re-rank -> evaluate -> its MLflow run.

Each step takes the typed Job and returns typed results: `load_eval_data` -> `EvalData`, `select_heads` ->
`HeadSelection`, `build_reranker` -> the re-ranker (the CLI, the Python API and PyTerrier all build it here),
`rerank_queries` -> `Reranking`, assembled into a `JobResult` by `rerank_pipeline`. `run_job` reads as the pipeline it
is: the tracker claims the job's identity (or says it FINISHED already), the run computes, corexp.pipeline.record logs.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from corexp.components.heads import DetectionTable, Head, HeadSelection, SelectionContext
from corexp.components.judged import assign_folds, check_disjoint, judged_queries, judged_table, read_judged
from corexp.data.evaluation import Evaluation, evaluate, metric_key
from corexp.engine.memory import PeakMemory
from corexp.engine.models import ModelInfo, resolve_device
from corexp.engine.prompt import PromptBuilder
from corexp.engine.readout_cache import ReadoutCache
from corexp.engine.reranker import AttentionReranker
from corexp.engine.scoring import rank, trec_scores
from corexp.errors import CorexpError
from corexp.job import Job
from corexp.pipeline.results import EvalData, HeadPlan, JobResult, Reranking
from corexp.tracking.tracker import StoredRun, Tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_eval_data(job: Job) -> EvalData:
    ds = job.data.load()
    qids = job.data.queries(ds)
    cands = job.first_stage.candidates(ds, qids, job.paths.cache, job.options.progress, job.data.drop_self_hits)
    return EvalData(ds, qids, cands, evaluate(ds.qrels, cands.top, list(job.measures)))


def model_key(job: Job, info: ModelInfo) -> str:
    """The model's part of the detection cache key (its files' identity and precision), without loading its weights."""
    return f"{job.model.name}:{info.description}:{info.sha256}:{job.model.dtype}"


def detection(job: Job, eval_qids: list[str], info: ModelInfo) -> DetectionTable:
    """This job's detection table (METHOD.md §4): keyed by the tokenizer's prompts, the model loaded only to compute it."""
    prompt = job.prompt.for_detection(job.detection.max_words)
    builder = PromptBuilder(job.model.tokenizer(job.paths.cache), prompt, job.model.template)

    def reranker() -> AttentionReranker:
        return AttentionReranker(job.model.load(job.paths.cache), prompt, None, job.model.template)

    return job.detection.table(builder, job.first_stage, set(eval_qids), job.paths.cache, model_key(job, info), reranker,
                               job.options.progress, job.heads.detection_shuffle)


def context(job: Job, info: ModelInfo, table: DetectionTable | None) -> SelectionContext:
    return SelectionContext(info.n_layers, info.n_heads, job.model.tau, dict(job.model.published_heads), table)


def select_heads(job: Job, eval_qids: list[str], info: ModelInfo) -> tuple[HeadSelection, int]:
    """The heads of this run and the layers to load (re-selecting where a truncation cut selected heads)."""
    ctx = context(job, info, detection(job, eval_qids, info) if job.heads.needs_detection else None)
    selection = job.heads.select(ctx)
    if selection.heads is not None:
        bad = [f"{l}-{h}" for l, h in selection.heads if not (0 <= l < info.n_layers and 0 <= h < info.n_heads)]
        if bad:
            raise CorexpError(f"heads {bad[:3]} are outside the model ({info.n_layers} layers x {info.n_heads} heads)")
    keep = job.truncation.keep(info.n_layers, selection.deepest_layer)
    reselected = job.heads.reselect(selection, keep, ctx)
    if reselected.reselected and not selection.reselected:
        log.warning("truncation to %d layers removed selected heads; re-selected among kept layers", keep)
    return reselected, keep


def readout_cache(job: Job, lm: Any) -> ReadoutCache:
    return ReadoutCache(job.paths.cache, f"{lm.source}:{lm.sha256}:{lm.dtype}:{lm.device.type}")


def judges_heads(job: Job) -> bool:
    """Heads detected on judged re-ranking prompts (detection.instances=judged; components/judged.py)."""
    return job.heads.needs_detection and job.detection.judged


def judged_plan(job: Job, data: EvalData, info: ModelInfo) -> tuple[list[AttentionReranker], HeadPlan]:
    """Heads detected on judged re-ranking prompts, read from the read-out cache (kept whatever `readout_cache` says:
    the table of every head is the detection): in-domain by k-fold cross-validation (detection.folds; each fold scored
    with heads detected on the others), or on another judged data set. The model keeps every layer (the tables read
    every head; the scores do not depend on the layers above a head set). One re-ranker per head set."""
    det = job.detection
    if det.folds is None:  # another data set: refuse an overlap before anything is loaded
        ds = det.load()
        qids = judged_queries(ds, det.num_queries, det.seed)
        check_disjoint([q for q in qids if data.ds.queries.get(q) == ds.queries[q]], data.qids)
    lm = job.model.load(job.paths.cache)
    cache = readout_cache(job, lm)
    reader = AttentionReranker(lm, job.prompt, None, job.model.template, readout_cache=cache)
    ctx = functools.partial(context, job, info)
    if det.folds is not None:
        fold_of = assign_folds(data.qids, det.folds, det.seed)
        judged = read_judged(reader, data.ds, data.candidates.top, data.qids, job.options.progress)
        selections, detected_on = [], []
        for fold in range(det.folds):
            scored = [q for q in data.qids if fold_of[q] == fold]
            detect = [q for q in data.qids if fold_of[q] != fold and q in judged]
            check_disjoint(detect, scored, f" of fold {fold}")
            selections.append(job.heads.select(ctx(judged_table([judged[q] for q in detect]))))
            detected_on.append(tuple(detect))
        plan = HeadPlan(tuple(selections), fold_of, tuple(detected_on))
    else:
        cands = job.first_stage.candidates(ds, qids, job.paths.cache, job.options.progress, job.data.drop_self_hits)
        judged = read_judged(reader, ds, cands.top, qids, job.options.progress)
        plan = HeadPlan((job.heads.select(ctx(judged_table(list(judged.values())))),), {}, (tuple(judged),))
    return [AttentionReranker(lm, job.prompt, sel.heads, job.model.template, readout_cache=cache,
                              calibrate=job.scoring.calibration) for sel in plan.selections], plan


def build_reranker(job: Job, heads: list[Head] | None = None, eval_qids: list[str] = (), info: ModelInfo | None = None
                   ) -> tuple[AttentionReranker, HeadSelection]:
    """The job's re-ranker: its heads (given, or chosen by its selector), the layers its truncation keeps, the prompt
    as its data set reads it, its scoring and read-out cache. The one place a re-ranker is built from components."""
    info = info or job.model.info(job.paths.cache)
    if heads is None and judges_heads(job):
        if job.detection.folds is not None:
            raise CorexpError("detection=crossval scores each fold with its own heads: run it as a job (python -m corexp), "
                              "not as one re-ranker")
        ds = job.data.load()
        qids = job.data.queries(ds)
        data = EvalData(ds, qids, job.first_stage.candidates(ds, qids, job.paths.cache, False, job.data.drop_self_hits), None)
        rerankers, plan = judged_plan(job, data, info)
        return rerankers[0], plan.selections[0]
    if heads is None:
        selection, keep = select_heads(job, list(eval_qids), info)
    else:
        selection = HeadSelection([tuple(h) for h in heads], metric="given")
        keep = job.truncation.keep(info.n_layers, selection.deepest_layer)
    lm = job.model.load(job.paths.cache, keep_layers=keep)
    cache = readout_cache(job, lm) if job.options.readout_cache else None
    rr = AttentionReranker(lm, job.prompt, selection.heads, job.model.template, readout_cache=cache,
                           calibrate=job.scoring.calibration)
    return rr, selection


def rerank_queries(job: Job, data: EvalData, rerankers: list[AttentionReranker], plan: HeadPlan | None = None) -> Reranking:
    """Each query re-ranked by the re-ranker of its head set (plan: its cross-validation fold; else the one)."""
    plan = plan or HeadPlan((HeadSelection(None),))
    out = Reranking()
    for qid in tqdm(data.qids, desc=f"re-rank {job.data.name} ({job.model.name})", disable=not job.options.progress):
        rr = rerankers[plan.index(qid)]
        cand = data.candidates.top[qid]
        if not cand:
            out.run[qid] = cand
            continue
        ids = cand.ids
        docs = data.ds.candidate_docs(qid, ids)
        t0 = time.perf_counter()
        scored = rr.score(data.ds.queries[qid], docs, qid)
        if scored.stats.degenerate:
            out.degenerate.append(qid)
            log.warning("query %s: %s, no ranking from the attention (it keeps the first-stage order)", qid,
                        scored.stats.degenerate)
        if not scored.stats.cached:
            out.latencies.append(time.perf_counter() - t0)
        out.stats.append(scored.stats)
        final = job.fusion.fuse(ids, scored.scores, cand.scores)
        out.run[qid] = trec_scores(rank(ids, final))
        words = [len(text.split()) for text in rr.doc_texts(docs)]  # as the prompt shows them (the length-bias test)
        out.rows += [{"query_id": qid, "doc_id": d, "first_stage_rank": i + 1, "words": words[i],
                      "attention_score": scored.scores[i], "final_score": final[i]} for i, d in enumerate(ids)]
    job.scoring.check_degenerate(out.degenerate, len(out.stats))
    return out


def rerank_pipeline(job: Job, info: ModelInfo, on_data: Any = None) -> JobResult:
    """Data, first stage, heads, truncated model, re-ranking and evaluation; no MLflow calls.

    on_data(EvalData) is called once the evaluation data and the first stage are known (tracking tags them early, so
    that a run that fails later still says what it was run on).
    """
    data = load_eval_data(job)
    if on_data is not None:
        on_data(data)
    with PeakMemory(str(resolve_device(job.model.device))) as memory:  # truncated model + re-ranking working memory
        if judges_heads(job):
            rerankers, plan = judged_plan(job, data, info)
        else:
            rr, selection = build_reranker(job, eval_qids=data.qids, info=info)
            rerankers, plan = [rr], HeadPlan((selection,))
        reranking = rerank_queries(job, data, rerankers, plan)
    lm = rerankers[0].lm
    return JobResult(data, plan.selections[0], info, lm.kept_layers, lm.source, reranking,
                     evaluate(data.ds.qrels, reranking.run, list(job.measures)), memory.peak_mb, plan=plan)


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


def summarize(job: Job, tracker: Tracker, run_id: str, name: str, metrics: dict[str, float],
              evaluations: tuple[Evaluation, Evaluation] | None = None, skipped: str = "") -> JobSummary:
    """The end-of-job summary (the primary measure is the first of data.measures)."""
    from scipy.stats import ttest_rel

    measure = job.measures[0]
    p = None
    if evaluations is not None:
        (_, a), (_, b) = evaluations
        qs = sorted(a)
        x, y = [a[q][str(measure)] for q in qs], [b.get(q, {}).get(str(measure), 0.0) for q in qs]
        if len(qs) > 1 and x != y:
            p = float(ttest_rel(y, x).pvalue)
    return JobSummary(name, run_id, str(measure), metrics.get(metric_key("first_stage", measure), float("nan")),
                      metrics.get(metric_key("rerank", measure), float("nan")), p, int(metrics.get("queries", 0)),
                      float(metrics.get("wall_time_s", 0.0)), tracker.open_command(run_id), dict(metrics), skipped)


def run_job(job: Job) -> JobSummary:
    """Run one validated job end to end (unless its identity already has a FINISHED run) and summarize it."""
    from corexp.pipeline.record import log_data, log_result, output_dir

    seed_everything(job.options.seed)
    for warning in job.ignored:
        log.warning(warning)
    info = job.model.info(job.paths.cache)  # the model's config only (offline or gated ids fail here, within seconds)
    job.heads.check_dims(info.n_layers, info.n_heads)  # settings bounded by the model's size, before any weight loads
    job.truncation.check_dims(info.n_layers)
    tracker = job.tracking.open()
    claim = tracker.claim(job.request(), force=job.options.force)
    if claim.finished is not None:
        done: StoredRun = claim.finished
        return summarize(job, tracker, done.run_id, done.name, done.metrics, skipped="the same config and code already FINISHED")
    with claim.run.running() as run:
        wall, cpu = time.perf_counter(), time.process_time()
        result = rerank_pipeline(job, info, on_data=lambda data: log_data(run, job, data))
        result.wall_time_s, result.cpu_time_s = time.perf_counter() - wall, time.process_time() - cpu
        log_result(run, job, result, output_dir(job))
    log.info("run %s (%s): %s", run.name, run.run_id, {k: round(v, 4) for k, v in run.metrics.items() if "." in k})
    return summarize(job, tracker, run.run_id, run.name, run.metrics, (result.data.evaluation, result.evaluation))
