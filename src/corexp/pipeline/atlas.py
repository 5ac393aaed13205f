"""The head atlas's computation (pipeline/atlas_record.py runs and logs it, studies/atlas.py reports it): for one
job's model and data, the nDCG@10 of every single head, every layer and every window of consecutive layers, of
detected head sets, of ICR and of the oracle top-k, all scored from the read-out cache exactly as a job scores a head
set (METHOD.md §3). In the compute path: a change here changes the code digest, so an atlas of older code is computed
again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from corexp.components.heads import Head, HeadSelection
from corexp.data.evaluation import evaluate
from corexp.engine.reranker import prompt_table
from corexp.engine.scoring import document_scores, rank, trec_scores
from corexp.job import Job
from corexp.pipeline.run import build_reranker, load_eval_data

MEASURE = "nDCG@10"


@dataclass
class QueryTables:
    """One query's read-out, in candidate order: every head's calibrated token scores over the documents' tokens."""

    doc_ids: list[str]
    spans: list[tuple[int, int]]  # token span of each candidate (candidate order; dropped candidates: (0, 0))
    rows: np.ndarray  # (heads, tokens) calibrated token scores, rows in `labels` order
    labels: list[Head]


@dataclass
class Atlas:
    model: str
    dataset: str
    n_layers: int
    n_heads: int
    queries: int
    heads: pd.DataFrame  # layer, head, nDCG@10, rank
    layers: pd.DataFrame  # layer, nDCG@10
    windows: pd.DataFrame  # width, start, end, nDCG@10
    sets: pd.DataFrame  # head set, heads, nDCG@10, note
    detected: dict[str, list[Head]] = field(default_factory=dict)


def query_tables(job: Job) -> tuple[list[str], dict[str, QueryTables], Any]:
    """The evaluation queries and each one's head table (read from the cache, or read out once)."""
    data = load_eval_data(job)
    rr, _ = build_reranker(job, eval_qids=data.qids)
    out = {}
    for qid in data.qids:
        cand = data.candidates.top[qid]
        table, enc, order = prompt_table(rr, data.ds.queries[qid], data.ds.candidate_docs(qid, cand.ids), qid)
        spans = [(0, 0)] * len(cand)
        for pos, idx in enumerate(order):
            spans[idx] = enc.doc_spans[pos]
        out[qid] = QueryTables(cand.ids, spans, table.calibrated.numpy(), table.labels)
    return data.qids, out, data


def set_scores(qt: QueryTables, rows: list[int]) -> list[float]:
    """Document scores of a head set: its heads' token scores summed, then the mean-2σ mask and sum per document."""
    import torch

    return document_scores(torch.from_numpy(qt.rows[rows].sum(axis=0)), qt.spans)


def evaluate_set(tables: dict[str, QueryTables], rows_of: dict[str, list[int]], qrels: dict, measures: list[Any]) -> float:
    """Mean nDCG@10 of one head set (rows per query: the table rows of its heads) over the queries, ranked as a job ranks."""
    run = {}
    for qid, qt in tables.items():
        run[qid] = trec_scores(rank(qt.doc_ids, set_scores(qt, rows_of[qid])))
    return evaluate(qrels, run, measures).means[str(measures[0])]


def compute(job: Job, widths: tuple[int, ...] = (1, 2, 3, 4), k: int = 8, selections: dict[str, HeadSelection] | None = None) -> Atlas:
    """Every head, layer and window of `widths` layers, the detected sets, ICR and the oracle top-k, on the job's data."""
    from corexp.data.evaluation import parse_measures

    qids, tables, data = query_tables(job)
    measures = parse_measures([MEASURE])
    labels = next(iter(tables.values())).labels
    index = {h: i for i, h in enumerate(labels)}
    n_layers, n_heads = max(lh[0] for lh in labels) + 1, max(lh[1] for lh in labels) + 1

    def rows(heads: list[Head]) -> dict[str, list[int]]:
        return {q: [index[h] for h in heads] for q in tables}

    qrels = data.ds.qrels
    head_rows = [{"layer": l, "head": h, MEASURE: evaluate_set(tables, rows([(l, h)]), qrels, measures)} for l, h in labels]
    heads = pd.DataFrame(head_rows)
    heads["rank"] = heads[MEASURE].rank(ascending=False, method="min").astype(int)
    layer_heads = {layer: [(layer, h) for h in range(n_heads)] for layer in range(n_layers)}
    layers = pd.DataFrame([{"layer": layer, MEASURE: evaluate_set(tables, rows(hs), qrels, measures)} for layer, hs in layer_heads.items()])
    windows = []
    for w in widths:
        for start in range(n_layers - w + 1):
            hs = [h for layer in range(start, start + w) for h in layer_heads[layer]]
            windows.append({"width": w, "start": start, "end": start + w, MEASURE: evaluate_set(tables, rows(hs), qrels, measures)})
    windows = pd.DataFrame(windows)
    sets = [{"head set": "ICR (all heads)", "heads": "all", MEASURE: evaluate_set(tables, rows(labels), qrels, measures),
             "note": "every head"}]
    detected = {}
    for name, sel in (selections or {}).items():
        if sel.heads is None:
            continue
        detected[name] = list(sel.heads)
        note = f"window [{sel.window[0]}, {sel.window[1]}) chosen on the detection set" if sel.window else "detected on the detection set"
        sets.append({"head set": name, "heads": ",".join(f"{l}-{h}" for l, h in sel.heads),
                     MEASURE: evaluate_set(tables, rows(list(sel.heads)), qrels, measures), "note": note})
    best = heads.sort_values([MEASURE, "layer", "head"], ascending=[False, True, True]).head(k)
    oracle = [(int(r.layer), int(r.head)) for r in best.itertuples()]
    sets.append({"head set": f"oracle top-{k} (upper bound)", "heads": ",".join(f"{l}-{h}" for l, h in oracle),
                 MEASURE: evaluate_set(tables, rows(oracle), qrels, measures),
                 "note": "the k best single heads ON THE EVALUATION QUERIES: an upper bound, not a method"})
    return Atlas(job.model.name, job.data.name, n_layers, n_heads, len(qids), heads, layers, windows, pd.DataFrame(sets), detected)
