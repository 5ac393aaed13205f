"""Calibrated document scores (METHOD.md §3): c = s(q) - s("N/A"), mean-2σ mask, sum; ranking with tie-breaks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from corexp.data.datasets import Ranking
from corexp.errors import CorexpError
from corexp.settings import Component, setting


@dataclass(frozen=True)
class Scoring(Component):
    """The `scoring` group: how a document's score is read from the attention (METHOD.md §3)."""

    name: ClassVar[str] = "default"
    calibration: bool = setting(True, doc="subtract the content-free query's attention (c = s(q) - s('N/A')); false: s(q) "
                                          "alone, the length-bias ablation")
    max_degenerate: float = setting(0.1, ge=0, le=1, doc="share of queries whose attention scores may be degenerate (all "
                                                         "equal or non-finite: no ranking) before the run fails")

    def check_degenerate(self, degenerate: list[str], queries: int) -> None:
        """Fail the run when more than `max_degenerate` of its queries got no ranking from the attention."""
        if queries and len(degenerate) > self.max_degenerate * queries:
            raise CorexpError(f"{len(degenerate)} of {queries} queries got degenerate attention scores (all equal or "
                              f"non-finite, e.g. query {degenerate[0]}), more than scoring.max_degenerate="
                              f"{self.max_degenerate:g}: the model's weights may be damaged (python -m corexp.verify_cache "
                              "checks the model cache) or the prompt holds no document text")

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


def head_document_scores(calibrated: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """`document_scores` applied to every head alone (METHOD.md §4, QRHead's detection): calibrated is (heads, tokens),
    each head's mean-2σ mask is its own, computed in the table's precision (fp32) as QRHead's code does: in float64 a
    token on the threshold can fall on the other side. Returns (heads, documents); one token: c_j; none: 0."""
    c = calibrated
    out = torch.zeros((c.shape[0], len(spans)), dtype=c.dtype)
    for i, (a, b) in enumerate(spans):
        part = c[:, a:b]
        n = int(part.shape[1])
        if n == 1:
            out[:, i] = part[:, 0]
        elif n > 1:
            threshold = part.mean(dim=1, keepdim=True) - 2 * part.std(dim=1, unbiased=True, keepdim=True)
            out[:, i] = torch.where(part > threshold, part, torch.zeros_like(part)).sum(dim=1)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def rank(doc_ids: list[str], scores: list[float]) -> Ranking:
    """Descending score; ties by first-stage rank (the order of doc_ids). Always a permutation of doc_ids."""
    order = sorted(range(len(doc_ids)), key=lambda i: (-scores[i], i))
    return Ranking((doc_ids[i], scores[i]) for i in order)


def trec_scores(ranked: Ranking) -> Ranking:
    """Strictly decreasing scores for the TREC file, so trec_eval's own tie-breaking can never reorder it."""
    n = len(ranked)
    return Ranking((d, float(n - i)) for i, (d, _) in enumerate(ranked))
