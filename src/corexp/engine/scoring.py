"""Calibrated document scores (METHOD.md §3): c = s(q) - s("N/A"), mean-2σ mask, sum; ranking with tie-breaks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from corexp.data.datasets import Ranking
from corexp.settings import Component, setting


@dataclass(frozen=True)
class Scoring(Component):
    """The `scoring` group: how a document's score is read from the attention (METHOD.md §3)."""

    name: ClassVar[str] = "default"
    calibration: bool = setting(True, doc="subtract the content-free query's attention (c = s(q) - s('N/A')); false: s(q) "
                                          "alone, the length-bias ablation")

    def label(self, hide: frozenset[str] = frozenset()) -> str | None:
        return None if self.calibration else "no calibration"


def document_scores(calibrated: torch.Tensor, spans: list[tuple[int, int]]) -> list[float]:
    """Per document: sum of c_j over its tokens with c_j > mean - 2*std (unbiased); one token: c_j; none: 0."""
    scores = []
    for a, b in spans:
        c = calibrated[a:b].double()
        n = int(c.numel())
        if n == 0:
            scores.append(0.0)
        elif n == 1:
            scores.append(float(c[0]))
        else:
            threshold = c.mean() - 2 * c.std(unbiased=True)
            scores.append(float(c[c > threshold].sum()))
    return [s if s == s and abs(s) != float("inf") else 0.0 for s in scores]


def rank(doc_ids: list[str], scores: list[float]) -> Ranking:
    """Descending score; ties by first-stage rank (the order of doc_ids). Always a permutation of doc_ids."""
    order = sorted(range(len(doc_ids)), key=lambda i: (-scores[i], i))
    return Ranking((doc_ids[i], scores[i]) for i in order)


def trec_scores(ranked: Ranking) -> Ranking:
    """Strictly decreasing scores for the TREC file, so trec_eval's own tie-breaking can never reorder it."""
    n = len(ranked)
    return Ranking((d, float(n - i)) for i, (d, _) in enumerate(ranked))
