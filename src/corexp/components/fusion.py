"""Fusion of the attention score with the first stage's (METHOD.md §3): one class per option of `fusion`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from corexp.engine.scoring import rank
from corexp.settings import Component, setting


def minmax(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0] * len(values) if hi == lo else [(v - lo) / (hi - lo) for v in values]


class Fusion(Component):
    """How the attention score is combined with the first stage's (one class per option of `fusion`)."""

    def fuse(self, doc_ids: list[str], attn_scores: list[float], first_scores: list[float]) -> list[float]:
        raise NotImplementedError


@dataclass(frozen=True)
class NoFusion(Fusion):
    """The attention score alone."""

    key_name: ClassVar[str] = "NoFusion"

    name: ClassVar[str] = "none"

    def fuse(self, doc_ids: list[str], attn_scores: list[float], first_scores: list[float]) -> list[float]:
        return list(attn_scores)


@dataclass(frozen=True)
class LinearFusion(Fusion):
    """alpha * minmax(attention score) + (1 - alpha) * minmax(first-stage score), per query."""

    key_name: ClassVar[str] = "Linear"

    name: ClassVar[str] = "linear"
    alpha: float = setting(0.5, ge=0, le=1, doc="weight of the attention score")

    def fuse(self, doc_ids: list[str], attn_scores: list[float], first_scores: list[float]) -> list[float]:
        if not doc_ids:
            return []
        a, f = minmax(attn_scores), minmax(first_scores)
        return [self.alpha * x + (1 - self.alpha) * y for x, y in zip(a, f)]

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "fusion=linear"


@dataclass(frozen=True)
class RRFFusion(Fusion):
    """Reciprocal-rank fusion of the attention ranking and the first-stage ranking: sum of 1 / (rrf_k + rank)."""

    key_name: ClassVar[str] = "RRF"

    name: ClassVar[str] = "rrf"
    rrf_k: int = setting(60, ge=1, doc="reciprocal-rank fusion constant")

    def fuse(self, doc_ids: list[str], attn_scores: list[float], first_scores: list[float]) -> list[float]:
        attn_rank = {d: r for r, (d, _) in enumerate(rank(doc_ids, attn_scores), 1)}
        return [1 / (self.rrf_k + attn_rank[d]) + 1 / (self.rrf_k + i + 1) for i, d in enumerate(doc_ids)]

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "fusion=rrf"
