"""What a job computes, as typed results: the evaluation data, the re-ranking, the whole job's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corexp.components.first_stage import Candidates
from corexp.components.heads import HeadSelection
from corexp.data.datasets import IRDataset, TrecRun
from corexp.data.evaluation import Evaluation
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
