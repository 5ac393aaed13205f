"""What a job computes, as typed results: the evaluation data, the re-ranking, the whole job's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corexp.components.first_stage import Candidates
from corexp.components.heads import HeadSelection
from corexp.data.datasets import IRDataset, TrecRun
from corexp.data.evaluation import LENGTH_BIASED_RATIO, Evaluation, gold_above_longest, metric_key
from corexp.engine.models import ModelInfo
from corexp.engine.reranker import QueryStats


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

    run: TrecRun = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    stats: list[QueryStats] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # queries that ran a forward (a read-out cache hit runs none)
    degenerate: list[str] = field(default_factory=list)  # queries whose attention scores gave no ranking


@dataclass(frozen=True)
class HeadPlan:
    """The head sets of a job: one, or one per cross-validation fold (detection.folds) with each query's fold and the
    queries each fold's heads were detected on (never the queries it scores)."""

    selections: tuple[HeadSelection, ...]
    fold_of: dict[str, int] = field(default_factory=dict)  # empty: every query with selections[0]
    detected_on: tuple[tuple[str, ...], ...] = ()

    def index(self, query_id: str) -> int:
        return self.fold_of.get(query_id, 0)

    @property
    def fold_jaccard_mean(self) -> float | None:
        """The mean Jaccard overlap of the folds' head sets (None: one head set, or every head)."""
        from corexp.components.heads import jaccard

        sels = self.selections
        pairs = [(a, b) for a in range(len(sels)) for b in range(a + 1, len(sels))]
        if not pairs or not all(s.heads for s in sels):
            return None
        return sum(jaccard(sels[a].heads, sels[b].heads) for a, b in pairs) / len(pairs)

    @property
    def folds(self) -> int:
        return len(self.selections) if self.fold_of else 0


@dataclass
class JobResult:
    """Everything a job computed; corexp.pipeline.record turns it into MLflow params, metrics and artifacts."""

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
    plan: HeadPlan | None = None  # the head sets (one per cross-validation fold); None: `selection` alone


def length_bias(res: JobResult) -> dict[str, tuple[float, float]]:
    """Per query: (gold above the longest non-relevant candidate, length ratio) — CoRe's length-bias test."""
    words: dict[str, dict[str, int]] = {}
    for r in res.reranking.rows:
        words.setdefault(r["query_id"], {})[r["doc_id"]] = int(r["words"])
    out = {}
    for qid, ranking in res.reranking.run.items():
        got = gold_above_longest(ranking, res.data.ds.qrels.get(qid, {}), words.get(qid, {}))
        if got is not None:
            out[qid] = got
    return out


def result_metrics(res: JobResult, measures: tuple[Any, ...], bias: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Every number a job logs as a metric: the measures of both stages, latency, prompt and pass statistics, memory,
    CoRe's length-bias test (`bias`: length_bias(res)), time and model size (METHOD.md §7)."""
    import resource

    import numpy as np
    import torch

    fs, rr = res.data.evaluation, res.evaluation
    metrics: dict[str, float] = {}
    for stage, evaluation in (("first_stage", fs), ("rerank", rr)):
        metrics.update({metric_key(stage, m): evaluation.means[str(m)] for m in measures})
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
                        "degenerate_queries": float(len(res.reranking.degenerate)),
                        "peak_memory_mb": float(res.peak_memory_mb),  # this job's model + re-ranking, above its start
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        if torch.cuda.is_available():
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if bias:
        gal = [g for g, _ in bias.values()]
        biased = [g for g, ratio in bias.values() if ratio <= LENGTH_BIASED_RATIO]
        metrics.update({"length_bias.gal": float(np.mean(gal)), "length_bias.queries": float(len(gal)),
                        "length_bias.queries_biased": float(len(biased))})
        if biased:
            metrics["length_bias.gal_biased"] = float(np.mean(biased))
    metrics.update({"wall_time_s": float(res.wall_time_s), "cpu_time_s": float(res.cpu_time_s)})
    if res.model.parameters:
        metrics["model_parameters"] = float(res.model.parameters)
    return metrics


def per_query_rows(res: JobResult, measures: tuple[Any, ...], bias: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """The per-query table: each measure at both stages and the length-bias test's values (`bias`: length_bias(res))."""
    fs, rr = res.data.evaluation, res.evaluation
    rows = []
    for q in sorted(fs.per_query):
        row: dict[str, Any] = {"query_id": q}
        for stage, evaluation in (("first_stage", fs), ("rerank", rr)):
            row.update({metric_key(stage, m): evaluation.per_query.get(q, {}).get(str(m), 0.0) for m in measures})
        gal, ratio = bias.get(q, (float("nan"), float("nan")))
        rows.append({**row, "length_bias.gal": gal, "length_bias.ratio": ratio})
    return rows
