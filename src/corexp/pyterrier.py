"""corexp as a PyTerrier transformer: `first_stage >> CorexpReranker.from_config(...)`, compared with pt.Experiment.

    pip install "corexp[pyterrier]"

    import pyterrier as pt
    from corexp.pyterrier import CorexpReranker
    rr = CorexpReranker.from_config(model="smollm2", heads="core", k=8)       # CoRe heads detected once (cached)
    pt.Experiment([bm25, bm25 % 20 >> rr], topics, qrels, eval_metrics=[nDCG @ 10])   # from ir_measures import nDCG

The transformer re-ranks each query's candidates in a results frame (columns qid, query, docno, text and optional
title, in first-stage order by `rank` or `score`) with a configured corexp re-ranker (any head set: all heads, a list,
or CoRe/QRHead heads detected from the configured detection data) and returns the frame with new `score` and `rank`.
No Java is needed: Terrier's JVM starts only for Terrier's own indexes and retrievers, not for re-ranking a frame.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyterrier as pt

from corexp.components.heads import Head
from corexp.data.datasets import Document, TrecRun
from corexp.engine.reranker import AttentionReranker
from corexp.engine.scoring import rank


class CorexpReranker(pt.Transformer):
    """Re-rank a PyTerrier results frame with an AttentionReranker (ICR, QRHead, CoRe or any head list)."""

    def __init__(self, reranker: AttentionReranker, name: str = "corexp"):
        self.reranker = reranker
        self.name = name

    @classmethod
    def from_config(cls, model: str = "smollm2", heads: str | list[Head] = "core", k: int = 8,
                    overrides: list[str] | None = None) -> CorexpReranker:
        """Compose corexp's configs (as the CLI does), validate them, and build the re-ranker (corexp.api).

        heads: "all" (ICR), "core", "qrhead", "random", "published", "layers", "window" (detected or drawn as a
        corexp job would, using the configured detection data; cached), or an explicit list of (layer, head). Layers
        above the deepest selected head are not loaded (truncation=auto).
        """
        from corexp.api import build_reranker

        rr = build_reranker(model, heads, overrides=["truncation=auto", *([f"heads.k={k}"] if isinstance(heads, str) else []),
                                                     *(overrides or [])])
        label = heads if isinstance(heads, str) else f"{len(heads)} heads"
        return cls(rr, name=f"corexp-{model}-{label}")

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        pt.validate.result_frame(inp, extra_columns=["query", "text"])
        out = []
        for qid, group in inp.groupby("qid", sort=False):
            order = "rank" if "rank" in group.columns else "score"
            group = group.sort_values(order, ascending=order == "rank", kind="stable")
            titles = group["title"].fillna("").astype(str) if "title" in group.columns else [None] * len(group)
            docs = [Document(str(d), t, str(x)) for d, t, x in zip(group["docno"], titles, group["text"])]
            scores = self.reranker.score(str(group["query"].iloc[0]), docs, str(qid)).scores
            position = {d: r for r, (d, _) in enumerate(rank([d.id for d in docs], scores))}  # ties: first-stage order
            ranked = group.assign(score=scores, rank=[position[d.id] for d in docs])
            out.append(ranked.sort_values("rank", kind="stable"))
        return pd.concat(out, ignore_index=True) if out else inp.assign(score=[], rank=[])

    def __repr__(self) -> str:
        return self.name


def results_frame(run: TrecRun, queries: dict[str, str], docs: Any) -> pd.DataFrame:
    """A PyTerrier results frame from a corexp run (qid -> ranked (docno, score)) with query and document texts."""
    rows = []
    for qid, ranked in run.items():
        found = docs.get_many([d for d, _ in ranked])
        for position, (docno, score) in enumerate(ranked):
            d = found[docno]
            rows.append({"qid": qid, "query": queries[qid], "docno": docno, "title": d.title or "", "text": d.text,
                         "score": float(score), "rank": position})
    return pd.DataFrame(rows)
