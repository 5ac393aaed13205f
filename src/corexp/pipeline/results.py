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
