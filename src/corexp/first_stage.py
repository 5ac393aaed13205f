"""First stage: the dataset's own run, or BM25 computed with bm25s and cached as a TREC run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from corexp.cache import cached, stable_key
from corexp.data import IRDataset, read_trec_run, write_trec_run
from corexp.errors import CorexpError

log = logging.getLogger(__name__)


def bm25_run(ds: IRDataset, query_ids: list[str], cfg: Any, hits: int = 100, show_progress: bool = True) -> dict[str, list[tuple[str, float]]]:
    """BM25 over the whole corpus (title + text, as Anserini's BEIR flat index)."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer(cfg.stemmer) if cfg.stemmer else None
    doc_ids, texts = [], []
    for d in ds.docs.iter_docs():
        doc_ids.append(d.id)
        texts.append(f"{d.title or ''} {d.text}".strip())
    if not doc_ids:
        raise CorexpError(f"{ds.name}: the corpus is empty, BM25 has nothing to index")
    stop = cfg.stopwords or None
    corpus_tokens = bm25s.tokenize(texts, stopwords=stop, stemmer=stemmer, show_progress=show_progress)
    retriever = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    retriever.index(corpus_tokens, show_progress=show_progress)
    q_tokens = bm25s.tokenize([ds.queries[q] for q in query_ids], stopwords=stop, stemmer=stemmer, show_progress=False)
    k = min(hits, len(doc_ids))
    results, scores = retriever.retrieve(q_tokens, k=k, show_progress=show_progress, n_threads=0)
    run: dict[str, list[tuple[str, float]]] = {}
    for row, qid in enumerate(query_ids):
        run[qid] = [(doc_ids[int(i)], float(s)) for i, s in zip(results[row], scores[row]) if float(s) > 0]
    return run


SOURCES = ("auto", "run", "bm25", "dense", "hybrid")


def first_stage_run(
    ds: IRDataset, query_ids: list[str], cfg: Any, cache_dir: Path, show_progress: bool = True
) -> tuple[dict[str, list[tuple[str, float]]], str]:
    """Ranked candidates per query and a label of where they came from.

    auto: the dataset's own run where it covers the queries (a test-split run has no training queries), else BM25;
    run: the dataset's run only; bm25: bm25s; dense: a sentence-transformers bi-encoder; hybrid: RRF of both.
    """
    source = cfg.source
    if source not in SOURCES:
        raise CorexpError(f"first_stage.source must be one of {', '.join(SOURCES)}, got '{source}'")
    if source in ("dense", "hybrid"):
        from corexp.dense import dense_run

        dense = dense_run(ds, query_ids, cfg, cache_dir, show_progress)
        label = f"dense:{cfg.encoder.name}"
        if source == "dense":
            run = dense
        else:
            run = rrf([cached_bm25(ds, query_ids, cfg, cache_dir, show_progress), dense], int(cfg.rrf_k), int(cfg.hits))
            label = f"hybrid:bm25s+{cfg.encoder.name}"
    else:
        shipped = ds.run if source in {"auto", "run"} else None
        if source == "run" and shipped is None:
            raise CorexpError(f"{ds.name} has no first-stage run; use first_stage=bm25 or set data.run_file")
        todo = query_ids if shipped is None else ([q for q in query_ids if q not in shipped] if source == "auto" else [])
        run = {q: shipped[q] for q in query_ids if shipped and q in shipped}
        labels = ["dataset-run"] if run else []
        if todo:
            run.update(cached_bm25(ds, todo, cfg, cache_dir, show_progress))
            labels.append("bm25s")
        label = "+".join(labels) or "bm25s"
    missing = [q for q in query_ids if q not in run]
    if missing:
        log.warning("%d of %d queries have no first-stage candidates (e.g. %s)", len(missing), len(query_ids), missing[0])
    return {q: run.get(q, []) for q in query_ids}, label


def rrf(runs: list[dict[str, list[tuple[str, float]]]], k: int, hits: int) -> dict[str, list[tuple[str, float]]]:
    """Reciprocal-rank fusion: sum of 1/(k + rank) over the runs; ties by the first run's order."""
    out = {}
    for qid in set().union(*runs):
        scores: dict[str, float] = {}
        for run in runs:
            for rank, (doc, _) in enumerate(run.get(qid, []), 1):
                scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
        order = {d: i for i, d in enumerate(scores)}
        out[qid] = sorted(scores.items(), key=lambda x: (-x[1], order[x[0]]))[:hits]
    return out


def cached_bm25(ds: IRDataset, query_ids: list[str], cfg: Any, cache_dir: Path, show_progress: bool) -> dict[str, list[tuple[str, float]]]:
    key = stable_key(ds.fingerprint, sorted(query_ids), cfg.k1, cfg.b, cfg.method, cfg.stemmer, cfg.stopwords,
                     int(cfg.get("hits", 100)))
    path = Path(cache_dir) / "runs" / f"bm25-{ds.name}-{key}.trec"
    if not path.is_file():
        log.info("computing BM25 for %d queries over %d documents (cached at %s)", len(query_ids), len(ds.docs), path)
    return read_trec_run(cached(path, lambda: write_trec_run(bm25_run(ds, query_ids, cfg, int(cfg.get("hits", 100)),
                                                                       show_progress), path, "corexp-bm25")))


def candidates(run: dict[str, list[tuple[str, float]]], depth: int, drop_self: bool = False) -> dict[str, list[tuple[str, float]]]:
    """The top-`depth` candidates per query (without the query itself where the dataset says so)."""
    if depth < 1:
        raise CorexpError(f"first_stage.depth must be >= 1, got {depth}")
    out = {}
    for qid, ranked in run.items():
        kept = [(d, s) for d, s in ranked if not (drop_self and d == qid)]
        out[qid] = kept[:depth]
    return out
