"""One job: data -> first stage -> head selection -> (truncated) model -> re-rank -> evaluate -> MLflow.

`run_job` checks, skips finished configs, and opens the MLflow run; `rerank_pipeline` computes (no MLflow calls);
`tracking.log_job` records what it computed.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from corexp import heads as H
from corexp import tracking
from corexp.data import IRDataset, load_dataset, select_queries
from corexp.detection import detection_masses
from corexp.errors import CorexpError
from corexp.evaluation import evaluate, parse_measures
from corexp.first_stage import candidates, first_stage_run
from corexp.memory import PeakMemory
from corexp.models import load_model, model_dims
from corexp.prompt import for_dataset, for_detection
from corexp.readout_cache import ReadoutCache
from corexp.reranker import AttentionReranker
from corexp.scoring import fuse, rank, trec_scores
from corexp.validation import check_model_dims, ignored_overrides, validate

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_layers(cfg: DictConfig, n_layers: int, heads: list[H.Head] | None) -> int:
    """Layers to load and run (METHOD.md §5); the values were validated before the job started."""
    mode = cfg.truncation.mode
    if mode == "auto":
        return n_layers if heads is None else max(l for l, _ in heads) + 1
    if mode == "fraction":
        return max(1, math.floor((1 - float(cfg.truncation.fraction)) * n_layers))
    if mode == "layers":
        return int(cfg.truncation.layers)
    return n_layers


def prompt_for(cfg: DictConfig) -> Any:
    """The prompt config as used on this job's data set (ICR's question instruction / text-only rule)."""
    return for_dataset(cfg.prompt, cfg.data.name, bool(cfg.data.get("question_style")))


def detection_table(cfg: DictConfig, eval_qids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance head masses and positive positions of this job's detection set (METHOD.md §4), cached by content."""
    cache = Path(cfg.paths.cache_dir)
    lm = load_model(cfg.model, cache)
    det_prompt = for_detection(prompt_for(cfg), cfg.detection.get("max_words"))
    det_rr = AttentionReranker(lm, det_prompt, None, cfg.model.template)
    model_key = f"{cfg.model.name}:{lm.source}:{lm.sha256}:{cfg.model.dtype}"
    return detection_masses(det_rr, set(eval_qids), cfg.detection, cfg.first_stage, cache, model_key, cfg.progress)


def select_heads(cfg: DictConfig, eval_qids: list[str], dims: tuple[int, int]) -> tuple[list[H.Head] | None, dict[str, Any]]:
    """The head set of this run and what to log about it (scores table, layer statistics)."""
    metric, k = cfg.heads.metric, int(cfg.heads.k)
    info: dict[str, Any] = {"metric": metric}
    if metric == "all":
        return None, info
    if metric == "published":
        return H.published_heads(cfg.model, k), info
    if metric == "random":
        return H.random_heads(dims[0], dims[1], k, int(cfg.heads.seed)), info
    tau = float(cfg.heads.tau if cfg.heads.tau is not None else cfg.model.tau)
    masses, pos = detection_table(cfg, eval_qids)
    core, qr = H.core_scores(masses, pos, tau), H.qrhead_scores(masses, pos)
    scores = core if metric == "core" else qr
    info.update(scores=scores, tau=tau if metric == "core" else None, instances=int(masses.shape[0]),
                jaccard_core_qrhead=H.jaccard(H.top_k(core, k), H.top_k(qr, k)))
    return H.top_k(scores, k), info


@dataclass
class JobResult:
    """Everything a job computed; tracking.log_job turns it into MLflow params, metrics and artifacts."""

    ds: IRDataset
    qids: list[str]
    first_stage_label: str
    candidates: dict[str, list[tuple[str, float]]]
    first_stage_eval: tuple[dict[str, float], dict[str, dict[str, float]]]
    heads: list[H.Head] | None
    head_info: dict[str, Any]
    n_layers: int
    n_heads: int
    kept_layers: int
    heads_reselected: bool = False
    model_source: str = ""
    model_sha256: str | None = None
    reranked: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    raw_rows: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    forward_passes: list[int] = field(default_factory=list)
    dropped: int = 0
    span_mismatches: int = 0
    cached_queries: int = 0
    rerank_eval: tuple[dict[str, float], dict[str, dict[str, float]]] = ({}, {})
    peak_memory_mb: float = 0.0
    wall_time_s: float = 0.0  # the whole job: data, first stage, detection, model loading, re-ranking
    cpu_time_s: float = 0.0  # CPU seconds of this process over the same span (all threads)


def rerank_pipeline(cfg: DictConfig, dims: tuple[int, int], on_data: Any = None) -> JobResult:
    """Data, first stage, heads, truncated model, re-ranking and evaluation; no MLflow calls.

    on_data(ds, label) is called once the evaluation data and the first stage are known (tracking tags them early,
    so that a run that fails later still says what it was run on).
    """
    measures = parse_measures(list(cfg.data.measures))
    cache = Path(cfg.paths.cache_dir)
    ds = load_dataset(cfg.data)
    qids = select_queries(ds, cfg.data.max_queries, cfg.data.get("query_ids"))
    full_run, fs_label = first_stage_run(ds, qids, cfg.first_stage, cache, cfg.progress)
    cands = candidates(full_run, int(cfg.first_stage.depth), bool(cfg.data.drop_self_hits))
    if on_data is not None:
        on_data(ds, fs_label)
    n_full, n_heads = dims
    heads, head_info = select_heads(cfg, qids, dims)
    if heads is not None:
        bad = [f"{l}-{h}" for l, h in heads if not (0 <= l < n_full and 0 <= h < n_heads)]
        if bad:
            raise CorexpError(f"heads {bad[:3]} are outside the model ({n_full} layers x {n_heads} heads)")
    keep = keep_layers(cfg, n_full, heads)
    reselected = False
    if heads is not None and max(l for l, _ in heads) >= keep:
        if cfg.heads.metric == "published":
            raise CorexpError(f"truncation keeps {keep} layers but published heads reach layer {max(l for l, _ in heads)}; use truncation=auto or none")
        if "scores" in head_info:
            heads = H.top_k(head_info["scores"], int(cfg.heads.k), max_layer=keep)
        else:
            heads = H.random_heads(keep, n_heads, int(cfg.heads.k), int(cfg.heads.seed))
        log.warning("truncation to %d layers removed selected heads; re-selected among kept layers", keep)
        reselected = True
    from corexp.models import resolve_device

    with PeakMemory(str(resolve_device(cfg.model.device))) as memory:  # truncated model + re-ranking working memory
        res = _rerank_all(cfg, ds, qids, cands, fs_label, measures, heads, head_info, (n_full, n_heads), keep, reselected)
    res.peak_memory_mb = memory.peak_mb
    return res


def _rerank_all(cfg, ds, qids, cands, fs_label, measures, heads, head_info, dims, keep, reselected) -> JobResult:
    lm = load_model(cfg.model, Path(cfg.paths.cache_dir), keep_layers=keep)
    table_cache = ReadoutCache(cfg.paths.cache_dir, f"{lm.source}:{lm.sha256}:{lm.dtype}:{lm.device.type}") \
        if cfg.get("readout_cache") else None
    rr = AttentionReranker(lm, prompt_for(cfg), heads, cfg.model.template, readout_cache=table_cache)
    res = JobResult(ds, qids, fs_label, cands, evaluate(ds.qrels, cands, measures), heads, head_info, *dims,
                    keep, reselected, lm.source, lm.sha256)
    for qid in tqdm(qids, desc=f"re-rank {cfg.data.name} ({cfg.model.name})", disable=not cfg.progress):
        cand = cands[qid]
        if not cand:
            res.reranked[qid] = []
            continue
        ids = [d for d, _ in cand]
        found = ds.docs.get_many(ids)
        missing = [d for d in ids if d not in found]
        if missing:
            raise CorexpError(f"first-stage run lists document '{missing[0]}' for query {qid}, but the corpus has no such id")
        t0 = time.perf_counter()
        scores = rr.score(ds.queries[qid], [found[d] for d in ids], qid)
        if rr.stats.cached:
            res.cached_queries += 1
        else:  # latency of queries that ran a forward (a read-out cache hit runs none)
            res.latencies.append(time.perf_counter() - t0)
        res.prompt_tokens.append(rr.stats.prompt_tokens)
        res.forward_passes.append(len(rr.stats.pass_tokens))
        res.dropped += rr.stats.dropped_docs
        res.span_mismatches += rr.stats.span_mismatches
        final = fuse(ids, scores, [s for _, s in cand], cfg.fusion.mode, float(cfg.fusion.alpha), int(cfg.fusion.rrf_k))
        res.reranked[qid] = trec_scores(rank(ids, final))
        res.raw_rows += [{"query_id": qid, "doc_id": d, "first_stage_rank": i + 1, "attention_score": scores[i],
                          "final_score": final[i]} for i, d in enumerate(ids)]
    res.rerank_eval = evaluate(ds.qrels, res.reranked, measures)
    return res


def run_job(cfg: DictConfig) -> dict[str, float]:
    """Run one configured job end to end and return its metrics."""
    validate(cfg)  # before anything is loaded or any run is created
    seed_everything(int(cfg.seed))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parse_measures(list(cfg.data.measures))
    overrides = tracking.job_overrides()
    for warning in ignored_overrides(cfg, overrides):
        log.warning(warning)
    dims = model_dims(cfg.model, Path(cfg.paths.cache_dir))  # the model's config only (offline/gated ids fail here)
    check_model_dims(cfg, *dims)
    mlflow = tracking.setup(cfg)
    chash = tracking.config_hash(cfg)
    previous = tracking.find_runs(mlflow, cfg.tracking.experiment, chash)
    stale = tracking.fail_stale_runs(mlflow, previous)
    if stale:
        log.warning("marked %d stale RUNNING run(s) of this config FAILED", stale)
    done = [r for r in previous if r.info.status == "FINISHED"]
    if done and not cfg.get("force", False):
        log.info("skipping: run %s already FINISHED this exact config (force=true reruns it)", done[0].info.run_id)
        return dict(done[0].data.metrics)
    with tracking.start_job_run(mlflow, cfg, chash, overrides) as active:
        wall, cpu = time.perf_counter(), time.process_time()
        result = rerank_pipeline(cfg, dims, on_data=lambda ds, label: tracking.log_data(mlflow, cfg, ds, label))
        result.wall_time_s, result.cpu_time_s = time.perf_counter() - wall, time.process_time() - cpu
        metrics = tracking.log_job(mlflow, cfg, result, out_dir)
        log.info("run %s (%s): %s", active.info.run_name, active.info.run_id,
                 {k: round(v, 4) for k, v in metrics.items() if "." in k and not k.startswith("heads.")})
    return metrics
