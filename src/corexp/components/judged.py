"""Head detection on any judged data set (METHOD.md §4, `detection.instances=judged`): the re-ranking prompts of judged
queries, read from the read-out cache, are the detection instances.

Each query's prompt (the job's prompt, first stage and depth) is read once: every head's real and N/A token scores
(engine/readout_cache.py), shared with re-ranking. From them come, per head and candidate, the raw attention mass
(CoRe, QR-R, windows) and the calibrated, masked score of the head alone (QRHead). Instances: each judged-relevant
candidate against the candidates judged non-relevant or unjudged (the other relevant ones take no part); QRHead's BEIR
metric ranks each query's candidates once, with the graded judgments and trec_eval's ideal DCG@10.

`detection.folds=k` (detection=crossval) detects in-domain: the evaluation queries are split into k seeded folds,
disjoint by query, and each fold is scored with heads detected on the other folds; `check_disjoint` refuses any
detection query among the queries it scores.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from corexp.components.detection import instance_arrays
from corexp.components.heads import DetectionTable
from corexp.data.datasets import IRDataset, Ranking
from corexp.engine.reranker import prompt_table
from corexp.errors import CorexpError


@dataclass(frozen=True)
class JudgedQuery:
    """One judged query's prompt read out: (layers, heads, candidates) raw masses and per-head calibrated scores, the
    candidates' ids and graded judgments in prompt order, and the query's ideal DCG@10 (all its judgments)."""

    query_id: str
    masses: np.ndarray
    scores: np.ndarray
    doc_ids: tuple[str, ...]
    gains: np.ndarray
    ideal: float

    @property
    def positives(self) -> list[int]:
        return [i for i, g in enumerate(self.gains) if g > 0]


def ideal_dcg10(judgments: Mapping[str, int]) -> float:
    """trec_eval's ideal DCG@10 (ndcg_cut.10): the query's judged gains, best first, linear gains."""
    gains = sorted((g for g in judgments.values() if g > 0), reverse=True)[:10]
    return float(sum(g / np.log2(i + 2) for i, g in enumerate(gains)))


def read_judged(rr: Any, ds: IRDataset, candidates: Mapping[str, Ranking], qids: list[str],
                progress: bool = True) -> dict[str, JudgedQuery]:
    """Every given query's prompt read out by `rr` (an AttentionReranker over every head, with a read-out cache): one
    forward per prompt the cache does not hold. Queries without candidates are left out."""
    n_layers, n_heads = rr.lm.kept_layers, rr.lm.num_heads
    out = {}
    for qid in tqdm(qids, desc=f"detection read-out {ds.name}", disable=not progress):
        ids = candidates.get(qid, Ranking()).ids
        if not ids:
            continue
        table, enc, order = prompt_table(rr, ds.queries[qid], ds.candidate_docs(qid, ids), qid)
        masses, scores = instance_arrays(table, enc.doc_spans, n_layers, n_heads)
        in_prompt = tuple(ids[i] for i in order)
        rels = ds.qrels.get(qid, {})
        out[qid] = JudgedQuery(qid, masses, scores, in_prompt, np.array([max(rels.get(d, 0), 0) for d in in_prompt]),
                               ideal_dcg10(rels))
    return out


def judged_table(queries: list[JudgedQuery]) -> DetectionTable:
    """The detection table of judged queries: one instance per judged-relevant candidate; shorter candidate lists padded
    (`valid` False)."""
    usable = [q for q in queries if q.positives]
    if not usable:
        raise CorexpError(f"none of the {len(queries)} detection queries has a judged-relevant candidate in its first-stage "
                          "list: no heads can be detected (raise first_stage.depth or use other detection data)")
    n_layers, n_heads = usable[0].masses.shape[:2]
    width = max(len(q.doc_ids) for q in usable)
    rows = [(qi, q, p) for qi, q in enumerate(usable) for p in q.positives]
    shape = (len(rows), n_layers, n_heads, width)
    masses, scores = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    gains, valid = np.zeros((len(rows), width)), np.zeros((len(rows), width), dtype=bool)
    doc_ids = np.full((len(rows), width), "", dtype=object)
    for i, (_, q, _) in enumerate(rows):
        d = len(q.doc_ids)
        masses[i, ..., :d], scores[i, ..., :d] = q.masses, q.scores
        gains[i, :d], valid[i, :d], doc_ids[i, :d] = q.gains, True, q.doc_ids
    return DetectionTable(masses, np.array([p for _, _, p in rows], dtype=np.int64), scores, doc_ids.astype(str), gains,
                          valid, np.array([q.ideal for _, q, _ in rows]), np.array([qi for qi, _, _ in rows], dtype=np.int64))


def assign_folds(qids: list[str], folds: int, seed: int) -> dict[str, int]:
    """Each query's fold: the sorted ids in one seeded order, dealt round-robin into `folds` folds (sizes differ by at
    most one)."""
    if folds > len(qids):
        raise CorexpError(f"detection.folds={folds} is more than the {len(qids)} evaluation queries: use 2..{len(qids)}")
    order = sorted(qids)
    random.Random(f"crossval:{seed}").shuffle(order)
    return {q: i % folds for i, q in enumerate(order)}


def check_disjoint(detection_qids: list[str], evaluation_qids: list[str], what: str = "") -> None:
    """Refuse to score a query with heads detected on it (one line)."""
    overlap = sorted(set(detection_qids) & set(evaluation_qids))
    if overlap:
        raise CorexpError(f"detection queries overlap the evaluation queries{what} ({len(overlap)}, e.g. '{overlap[0]}'): "
                          "heads would be chosen on the queries they score; use detection=crossval for in-domain "
                          "detection or other detection data")


def judged_queries(ds: IRDataset, limit: int | None, seed: int) -> list[str]:
    """The detection data set's judged queries (sorted), or a seeded sample of `limit` of them."""
    judged = ds.judged_queries()
    if not judged:
        raise CorexpError(f"{ds.name} has no judged-relevant query: it cannot serve as detection data")
    if limit is not None and limit < len(judged):
        judged = sorted(random.Random(seed).sample(judged, limit))
    return judged
