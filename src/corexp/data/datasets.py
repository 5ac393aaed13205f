"""Datasets: queries, qrels, documents and an optional first-stage run, from ir_datasets or a BEIR-layout folder.

`DataSource` is the `data` group's component (conf/data/*.yaml): where a data set comes from, which queries and
measures a job evaluates, and the fingerprint of its content (corpus, queries, qrels and run file) that enters a run's
identity: editing a judgment reruns the job, moving the folder does not.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from corexp.errors import CorexpError
from corexp.files import content_sha256
from corexp.settings import Component, setting

log = logging.getLogger(__name__)


class Ranking(list):
    """One query's ranked documents, best first: a list of (doc id, score) pairs with the accessors of rerankers'
    RankedResults — `ids`, `scores`, `top(k)`, `score_of(doc_id)`. First stages, the re-ranker and TREC runs all
    return it; being a list, it slices, iterates in pairs and compares like one."""

    @property
    def ids(self) -> list[str]:
        return [d for d, _ in self]

    @property
    def scores(self) -> list[float]:
        return [s for _, s in self]

    def top(self, k: int) -> Ranking:
        return Ranking(self[:k])

    def score_of(self, doc_id: str) -> float:
        for d, s in self:
            if d == doc_id:
                return s
        raise KeyError(doc_id)


TrecRun = dict[str, Ranking]  # query id -> its ranking (a TREC run file, a first stage's or a re-ranker's output)


@dataclass(frozen=True)
class Document:
    """A candidate document; title None: the record has no title field (QRHead's code adds "title\n" only then)."""

    id: str
    title: str | None
    text: str


class DocStore(Protocol):
    def get_many(self, ids: list[str]) -> dict[str, Document]: ...
    def iter_docs(self) -> Iterator[Document]: ...
    def __len__(self) -> int: ...


@dataclass
class IRDataset:
    """What an experiment needs from a dataset; `fingerprint` keys caches built from it."""

    name: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    docs: DocStore
    run: TrecRun | None = None
    fingerprint: str = ""  # queries, judgments and documents (first-stage runs are keyed on it)
    meta: dict[str, Any] = field(default_factory=dict)
    corpus_fingerprint: str = ""  # the documents alone: splits of one corpus share its embeddings

    def __post_init__(self) -> None:
        self.corpus_fingerprint = self.corpus_fingerprint or self.fingerprint

    def candidate_docs(self, query_id: str, ids: list[str]) -> list[Document]:
        """The documents of a query's first-stage candidates, in the given order; one line naming an id the corpus
        lacks."""
        found = self.docs.get_many(ids)
        missing = [d for d in ids if d not in found]
        if missing:
            raise CorexpError(f"first-stage run lists document '{missing[0]}' for query {query_id}, but the corpus of "
                              f"{self.name} has no such id")
        return [found[d] for d in ids]

    def judged_queries(self) -> list[str]:
        """The queries with at least one judged-relevant document (grade > 0), sorted."""
        return sorted(q for q in self.queries if any(r > 0 for r in self.qrels.get(q, {}).values()))


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn what a damaged file raises while it is read (a cut gzip stream, a file that is not gzip, bytes that are not
    UTF-8, an unreadable file) into one line naming the file and the fix."""
    try:
        yield
    except CorexpError:
        raise
    except UnicodeDecodeError as err:
        raise CorexpError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start} of a "
                          f"{'decompressed ' if path.suffix == '.gz' else ''}block); re-save the {what} as UTF-8") from None
    except EOFError:
        raise CorexpError(f"{path}: the gzip stream ends early (a cut download or copy); fetch the {what} again") from None
    except gzip.BadGzipFile:
        raise CorexpError(f"{path}: not a gzip file although it ends in .gz; compress it with gzip or drop the .gz suffix") from None
    except (OSError, zlib.error) as err:
        raise CorexpError(f"{path}: cannot read the {what} ({getattr(err, 'strerror', None) or err}); "
                          "check the file and its permissions") from None


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def file_digest(*paths: Path, memo_dir: Path | None = None) -> str:
    """sha256 over the files' bytes: a location-free identity. Each file's hash is memoised by path, size, mtime, inode
    and ctime (corexp.files.content_sha256): a job start need not re-read a large corpus that has not changed, and
    any write to it, even one that restores size and mtime, is hashed again."""
    h = hashlib.sha256()
    for path in paths:
        h.update(content_sha256(path, memo_dir, _hash_file).encode())
    return h.hexdigest()[:20]


def _hash_file(path: Path) -> str:
    fh_hash = hashlib.sha256()
    with _reading(path, "file"), open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            fh_hash.update(chunk)
    return fh_hash.hexdigest()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with _reading(path, "JSON lines file"), _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorexpError(f"{path}:{lineno}: malformed JSON line ({err.msg}); fix or remove that line") from None
            if not isinstance(obj, dict) or "_id" not in obj:
                raise CorexpError(f"{path}:{lineno}: each line needs an object with an '_id' field")
            yield obj


def read_beir_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with _reading(path, "qrels file"), _open_text(path) as fh:
        reader = csv.reader(fh, delimiter="\t")
        for lineno, row in enumerate(reader, 1):
            if not row or (lineno == 1 and row[0] == "query-id"):
                continue
            if len(row) == 4:  # TREC qrels: qid iter docid rel
                row = [row[0], row[2], row[3]]
            if len(row) != 3:
                raise CorexpError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score'")
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
            except ValueError:
                raise CorexpError(f"{path}:{lineno}: relevance '{row[2]}' is not an integer") from None
    return qrels


def read_trec_run(path: Path) -> TrecRun:
    """A TREC run as ranked lists (by score, then by the file's rank column)."""
    rows: dict[str, list[tuple[int, float, str]]] = {}
    with _reading(path, "TREC run"), _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise CorexpError(f"{path}:{lineno}: malformed TREC run line (need 'qid Q0 docid rank score tag')")
            try:
                rank, score = int(parts[3]), float(parts[4])
            except ValueError:
                raise CorexpError(f"{path}:{lineno}: rank/score are not numbers in the TREC run") from None
            rows.setdefault(parts[0], []).append((rank, score, parts[2]))
    return {qid: Ranking((d, s) for _, s, d in sorted(items, key=lambda x: (-x[1], x[0]))) for qid, items in rows.items()}


def write_trec_run(run: TrecRun, path: Path, tag: str) -> None:
    from corexp.files import atomic_write_text

    lines = [
        f"{qid} Q0 {doc} {rank} {score:.6f} {tag}"
        for qid in sorted(run)
        for rank, (doc, score) in enumerate(run[qid], 1)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


class DictDocStore:
    """All documents in memory: BEIR-layout folders (the SciFact/NFCorpus-sized sets this runs on locally)."""

    def __init__(self, docs: dict[str, Document]):
        self._docs = docs

    def get_many(self, ids: list[str]) -> dict[str, Document]:
        return {i: self._docs[i] for i in ids if i in self._docs}

    def iter_docs(self) -> Iterator[Document]:
        return iter(self._docs.values())

    def __len__(self) -> int:
        return len(self._docs)


class IrdsDocStore:
    """ir_datasets' own docstore: lookups by id without loading multi-million-document corpora into memory."""

    def __init__(self, dataset: Any):
        self._ds = dataset
        self._store = None

    def _lookup(self):
        if self._store is None:
            self._store = self._ds.docs_store()
        return self._store

    @staticmethod
    def _convert(doc: Any) -> Document:
        title = getattr(doc, "title", None)
        text = getattr(doc, "text", None)
        if text is None:
            text = getattr(doc, "default_text", lambda: "")()
        return Document(doc.doc_id, title, text)

    def get_many(self, ids: list[str]) -> dict[str, Document]:
        found = self._lookup().get_many(ids)
        return {i: self._convert(d) for i, d in found.items()}

    def iter_docs(self) -> Iterator[Document]:
        return (self._convert(d) for d in self._ds.docs_iter())

    def __len__(self) -> int:
        return self._ds.docs_count() or 0


def load_local(folder: str | Path, split: str, name: str, run_file: str | None = None) -> IRDataset:
    """A BEIR-layout folder; queries are restricted to those judged in qrels/<split>.tsv."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CorexpError(f"data folder {folder} does not exist; set data.local_dir to a BEIR-layout folder")
    corpus_path, queries_path = _find(folder, "corpus.jsonl"), _find(folder, "queries.jsonl")
    qrels_path = _find(folder / "qrels", f"{split}.tsv")
    for label, path, expected in (
        ("corpus", corpus_path, "corpus.jsonl"),
        ("queries", queries_path, "queries.jsonl"),
        ("qrels", qrels_path, f"qrels/{split}.tsv"),
    ):
        if path is None:
            hint = " (this split has no qrels: choose data.split with a qrels file)" if label == "qrels" else ""
            raise CorexpError(f"{folder}: missing {expected}{hint}")
    docs: dict[str, Document] = {}
    for obj in read_jsonl(corpus_path):
        doc_id = str(obj["_id"])
        if doc_id in docs:
            raise CorexpError(f"{corpus_path}: duplicate document id '{doc_id}'; document ids must be unique")
        title = obj.get("title")
        docs[doc_id] = Document(doc_id, None if title is None else str(title), obj.get("text") or "")
    qrels = read_beir_qrels(qrels_path)
    all_queries: dict[str, str] = {}
    for obj in read_jsonl(queries_path):
        qid = str(obj["_id"])
        if qid in all_queries:
            raise CorexpError(f"{queries_path}: duplicate query id '{qid}'; query ids must be unique")
        all_queries[qid] = str(obj.get("text") or "")
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise CorexpError(f"{qrels_path}: {len(missing)} judged query ids are not in queries.jsonl (e.g. '{missing[0]}')")
    queries = {q: all_queries[q] for q in qrels}
    run = None
    run_path = Path(run_file).expanduser() if run_file else next(iter(sorted(folder.glob("run*.trec*"))), None)
    if run_path is not None:
        if not run_path.is_file():
            raise CorexpError(f"first-stage run {run_path} does not exist; fix data.run_file")
        run = read_trec_run(run_path)
        if not run:  # never replaced by corexp's own BM25 in silence
            raise CorexpError(f"first-stage run {run_path} holds no ranking line; fix it, remove it (first_stage=bm25 "
                              "computes one) or point data.run_file at another run")
    # Content, not location: a moved checkout, a CI clone or a cluster node with another path hits the same caches.
    fingerprint = f"local-sha256:{file_digest(corpus_path, queries_path, qrels_path)}:{split}"
    return IRDataset(name, queries, qrels, DictDocStore(docs), run, fingerprint, {"source": str(folder), "split": split},
                     corpus_fingerprint=f"local-sha256:{file_digest(corpus_path)}")


def load_irds(irds_id: str, name: str, run_file: str | None = None) -> IRDataset:
    """Any ir_datasets id with queries and qrels; scoreddocs (if any) become the first-stage run. A download that
    cannot reach its host (offline, a proxy) is one line naming the data set and the local_dir way around it."""
    import requests

    try:
        return _load_irds(irds_id, name, run_file)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError) as err:
        raise CorexpError(f"'{name}' (ir_datasets '{irds_id}') could not be downloaded: its host cannot be reached (offline?) "
                          f"({type(err).__name__}); point the group's local_dir at a BEIR-layout copy (data.local_dir, "
                          "detection.local_dir) or run where ir_datasets can download") from None


def _load_irds(irds_id: str, name: str, run_file: str | None) -> IRDataset:
    import ir_datasets

    try:
        ds = ir_datasets.load(irds_id)
    except KeyError:
        raise CorexpError(f"unknown ir_datasets id '{irds_id}'; see https://ir-datasets.com for valid ids") from None
    if not ds.has_qrels():
        raise CorexpError(f"'{irds_id}' has no qrels; pick a split with relevance judgments (e.g. .../test)")
    if not ds.has_queries():
        raise CorexpError(f"'{irds_id}' has no queries")
    queries = {}
    for q in ds.queries_iter():
        text = getattr(q, "text", None)
        if text is None:
            text = q.default_text()
        queries[q.query_id] = text
    qrels: dict[str, dict[str, int]] = {}
    for qr in ds.qrels_iter():
        qrels.setdefault(qr.query_id, {})[qr.doc_id] = int(qr.relevance)
    queries = {q: t for q, t in queries.items() if q in qrels}
    run = None
    if run_file:
        run = read_trec_run(Path(run_file).expanduser())
    elif ds.has_scoreddocs():
        scored: dict[str, list[tuple[str, float]]] = {}
        for i, sd in enumerate(ds.scoreddocs_iter()):
            scored.setdefault(sd.query_id, []).append((sd.doc_id, float(sd.score) - i * 1e-9))
        run = {q: Ranking(sorted(v, key=lambda x: -x[1])) for q, v in scored.items()}
    return IRDataset(name, queries, qrels, IrdsDocStore(ds), run, f"irds:{irds_id}", {"source": irds_id},
                     corpus_fingerprint=f"irds-docs:{ir_datasets.docs_parent_id(irds_id)}")


def check_queries(ds: IRDataset) -> IRDataset:
    for qid, text in ds.queries.items():
        if not text.strip():
            raise CorexpError(f"query '{qid}' of {ds.name} has empty text; remove it or fix queries.jsonl")
    return ds


@dataclass(frozen=True)
class Source(Component):
    """Where queries, judgments, documents and a first-stage run come from: a BEIR-layout folder (wins) or an
    ir_datasets id."""

    name: str = setting(doc="data set name")
    irds_id: str | None = setting(None, null="none", doc="ir_datasets id", location=True)
    local_dir: str | None = setting(None, null="none", doc="BEIR-layout folder; wins over irds_id", location=True)
    split: str = setting("test", doc="qrels/<split>.tsv of local_dir")
    run_file: str | None = setting(None, null="local_dir/run*.trec or ir_datasets scoreddocs", doc="first-stage TREC run",
                                  location=True)

    def load(self) -> IRDataset:
        if self.local_dir:
            return check_queries(load_local(self.local_dir, self.split, self.name, self.run_file))
        if self.irds_id:
            return check_queries(load_irds(self.irds_id, self.name, self.run_file))
        raise CorexpError(f"data '{self.name}' sets neither local_dir nor irds_id; set data.local_dir or data.irds_id")

    def files(self) -> list[Path]:
        """The local files whose bytes are the data (corpus, queries, qrels of the split, run file), in a fixed order."""
        paths = []
        if self.local_dir:
            folder = Path(self.local_dir).expanduser()
            if not folder.is_dir():
                raise CorexpError(f"data folder {folder} does not exist; set data.local_dir to a BEIR-layout folder")
            paths = [p for p in (_find(folder, "corpus.jsonl"), _find(folder, "queries.jsonl"),
                                 _find(folder / "qrels", f"{self.split}.tsv")) if p is not None]
            run = Path(self.run_file).expanduser() if self.run_file else next(iter(sorted(folder.glob("run*.trec*"))), None)
        else:
            run = Path(self.run_file).expanduser() if self.run_file else None
        return [*paths, *([run] if run is not None and run.is_file() else [])]

    def fingerprint(self, memo_dir: Path | None = None) -> str:
        """The data's identity by content: sha256 of its local files (or the ir_datasets id, whose content is fixed)."""
        files = self.files()
        digest = file_digest(*files, memo_dir=memo_dir) if files else "none"
        return f"local-sha256:{digest}" if self.local_dir else f"irds:{self.irds_id}:{digest}"


@dataclass(frozen=True)
class DataSource(Source):
    """The `data` group: the evaluation data set, which of its queries a job evaluates and with which measures."""

    key_name: ClassVar[str] = "Data"

    max_queries: int | None = setting(None, ge=1, null="all queries", doc="evaluate the first N queries (sorted ids)")
    query_ids: list[str] | None = setting(None, doc="evaluate these query ids only")
    drop_self_hits: bool = setting(False, doc="drop a candidate whose id equals the query id (ArguAna, Quora)")
    question_style: bool = setting(False, doc="ICR's question instruction applies (prompt.instruction_style=auto)")
    measures: list[str] = setting(factory=lambda: ["nDCG@10", "R@10", "RR"], doc="ir_measures measures")
    forum: str | None = setting(None, null="none", doc="cqadupstack only")

    def queries(self, ds: IRDataset) -> list[str]:
        """The evaluation queries in a stable order (sorted ids), optionally the first N or the given ids."""
        return select_queries(ds, self.max_queries, self.query_ids)


def select_queries(ds: IRDataset, max_queries: int | None, query_ids: list[str] | None = None) -> list[str]:
    """Evaluation queries in a stable order (sorted ids), optionally the first N."""
    ids = sorted(ds.queries, key=_natural_key)
    if query_ids:
        wanted = [str(q) for q in query_ids]
        unknown = [q for q in wanted if q not in ds.queries]
        if unknown:
            raise CorexpError(f"query ids not in {ds.name}: {unknown[:5]}")
        ids = wanted
    if max_queries is not None:
        ids = ids[: int(max_queries)]
    return ids


def _natural_key(s: str) -> tuple[int, int | str]:
    return (0, int(s)) if s.isdigit() else (1, s)
