"""Re-ranker on a tiny random-weight checkpoint: calibrated scores equal a full eager reference computation."""

import functools

import pytest
import torch
from transformers import AutoModel

from corexp.data.datasets import Document
from corexp.engine.models import ModelSpec, load_model
from corexp.engine.prompt import PromptSpec, encode
from corexp.engine.reranker import AttentionReranker
from corexp.engine.scoring import document_scores

from tiny_models import save_tiny_checkpoint

DOCS = [Document("a", "T1", "the cells protein gene expression"), Document("b", "", "patients with cancer risk"),
        Document("c", "", "treatment study increased"), Document("d", "", "x")]
QUERY = "gene expression in cancer patients"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def any_tiny_dir(request, tmp_path_factory):
    """Full attention (cache cut back after one pass) and sliding windows (prefix pass, cache copied)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def load(tiny_dir, keep=None):
    cfg = ModelSpec(name="tiny", path=str(tiny_dir), dtype="float32", device="cpu", max_context=512)
    return load_model(cfg, tiny_dir, keep_layers=keep)


def reference_scores(tiny_dir, spec, heads, calibrate=True):
    model = AutoModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    lm = load(tiny_dir)
    texts = [d.text for d in DOCS]
    rows = []
    for q in (QUERY, "N/A"):
        enc = encode(lm.tokenizer, texts, q, spec, ("", ""), spec.instruction)
        with torch.no_grad():
            att = model(enc.input_ids, output_attentions=True).attentions
        s = sum(att[l][0, h, enc.q_start:enc.q_end].mean(0) for l, h in heads)
        rows.append((s, enc))
    (s_q, enc), (s_na, _) = rows
    c = s_q[: enc.q_start] - (s_na[: enc.q_start] if calibrate else 0)
    return document_scores(c, enc.doc_spans)


@functools.cache
def cached_reference(tiny_dir, heads, calibrate):
    """The eager reference of the default prompt, computed once per checkout, head set and calibration."""
    return reference_scores(tiny_dir, PromptSpec(), list(heads), calibrate)


@pytest.mark.parametrize("calibrate", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("strategy", ["tree", "cache", "table"])
def test_every_forward_strategy_with_and_without_calibration_equals_the_eager_reference(any_tiny_dir, strategy, shared,
                                                                                       calibrate, monkeypatch, tmp_path):
    """Tree pass, cut-back / copied cache and the read-out table, each with the N/A prompt sharing the documents' tokens
    and not (a forward of its own), each calibrated and not: the same scores as the eager reference. (Before the
    strategies were objects, calibration off with the table and an unshared N/A prompt returned calibrated scores.)"""
    import corexp.engine.forward as F
    from corexp.engine.readout_cache import ReadoutCache

    if not shared:
        monkeypatch.setattr(F, "shares_prefix", lambda enc, na: False)
    heads = [(0, 1), (2, 3), (3, 0)]
    cache = ReadoutCache(tmp_path, "tiny") if strategy == "table" else None
    rr = AttentionReranker(load(any_tiny_dir), PromptSpec(), heads, template="plain", one_pass=strategy == "tree",
                           readout_cache=cache, calibrate=calibrate)
    assert rr.forward.name == {"tree": "tree", "table": "read-out table"}.get(
        strategy, "cut-back cache" if any_tiny_dir.name.startswith("llama") else "copied cache")
    ref = cached_reference(any_tiny_dir, tuple(heads), calibrate)
    assert rr.score(QUERY, DOCS).scores == pytest.approx(ref, abs=1e-5)
    if strategy == "table":  # a second head set and the other calibration: from the stored table, no forward
        again = AttentionReranker(load(any_tiny_dir), PromptSpec(), heads[:2], template="plain", readout_cache=cache,
                                  calibrate=not calibrate).score(QUERY, DOCS)
        assert again.stats.cached and not again.stats.pass_tokens
        assert again.scores == pytest.approx(cached_reference(any_tiny_dir, tuple(heads[:2]), not calibrate), abs=1e-5)


@pytest.mark.parametrize("heads", [None, [(0, 1), (2, 3), (3, 0)]])
def test_scores_match_reference_and_na_pass_reuses_prefix(any_tiny_dir, heads):
    tiny_dir = any_tiny_dir
    spec = PromptSpec()
    lm = load(tiny_dir)
    rr = AttentionReranker(lm, spec, heads, template="plain", one_pass=False)
    scored = rr.score(QUERY, DOCS)
    got = scored.scores
    all_heads = heads or [(l, h) for l in range(4) for h in range(4)]
    ref = reference_scores(tiny_dir, spec, all_heads)
    assert got == pytest.approx(ref, abs=1e-5)
    texts = [d.text for d in DOCS]
    enc = encode(lm.tokenizer, texts, QUERY, spec, ("", ""), spec.instruction)
    na = encode(lm.tokenizer, texts, "N/A", spec, ("", ""), spec.instruction)
    passes = scored.stats.pass_tokens
    # No pass runs past the query (causal attention: later tokens cannot change the query rows).
    from corexp.engine.forward import CopiedCache, CutBackCache

    if isinstance(rr.forward, CutBackCache):  # one pass over prefix + query, then the N/A query on the cut-back cache
        assert passes == [enc.q_end, na.q_end - na.q_start]
    else:  # sliding windows: prefix alone, then each query on its own copy of the prefix cache
        assert passes == [enc.q_start, enc.q_end - enc.q_start, na.q_end - na.q_start]
    assert type(rr.forward) is (CutBackCache if tiny_dir.name.startswith("llama") else CopiedCache)
    assert passes[-1] < 0.4 * na.length and len(scored.stats.pass_seconds) == len(passes)


def test_truncated_model_gives_identical_scores(tiny_dir):
    heads = [(0, 2), (1, 1)]
    spec = PromptSpec()
    full = AttentionReranker(load(tiny_dir), spec, heads, template="plain")
    cut_lm = load(tiny_dir, keep=2)
    assert len(cut_lm.model.layers) == 2
    cut = AttentionReranker(cut_lm, spec, heads, template="plain")
    assert full.rerank(QUERY, DOCS) == cut.rerank(QUERY, DOCS)


def test_rerank_is_permutation_and_handles_degenerate_docs(tiny_dir):
    rr = AttentionReranker(load(tiny_dir), PromptSpec(), None, template="plain")
    docs = [Document("1", "", ""), Document("2", "", "same text"), Document("3", "", "same text"), Document("4", "", "z")]
    out = rr.rerank("query", docs)
    assert sorted(d for d, _ in out) == ["1", "2", "3", "4"]
    assert all(s == s and abs(s) != float("inf") for _, s in out)
    assert rr.rerank("query", [Document("only", "", "one candidate")])[0][0] == "only"


def test_prompt_overflow_reduces_depth(tiny_dir):
    cfg = PromptSpec()
    lm = load(tiny_dir)
    lm.max_context = 200
    rr = AttentionReranker(lm, cfg, None, template="plain")
    docs = [Document(str(i), "", "gene expression cells " * 3) for i in range(6)]
    out = rr.rerank(QUERY, docs)
    assert rr.score(QUERY, docs).stats.dropped_docs > 0 and len(out) == 6


def test_python_api_without_hydra_cli(tiny_dir):
    from corexp import build_reranker

    rr = build_reranker("smollm2", heads=[(1, 0), (2, 3)], overrides=[f"model.path={tiny_dir}", "model.gguf=null",
                                                                      "model.template=plain", "model.device=cpu"])
    assert rr.lm.kept_layers == 3  # loaded only up to the deepest head
    out = rr.rerank("gene expression", [("x", "cells protein"), ("y", "cancer risk"), ("z", "gene expression")])
    assert sorted(d for d, _ in out) == ["x", "y", "z"]
    assert [d for d, _ in rr.rerank("q", ["first text", "second text"])] in (["0", "1"], ["1", "0"])


def test_sliding_window_model_scores_match_reference(tmp_path):
    """Gemma-3 layout (sliding-window layers): the copied-cache path gives the eager reference scores."""
    tiny = save_tiny_checkpoint(tmp_path / "g", "gemma3")
    spec = PromptSpec()
    cfg = ModelSpec(name="tiny", path=str(tiny), dtype="float32", device="cpu", max_context=4096)
    lm = load_model(cfg, tiny)
    got = AttentionReranker(lm, spec, None, template="plain").score(QUERY, DOCS).scores
    model = AutoModel.from_pretrained(tiny, attn_implementation="eager").eval()
    rows = []
    for q in (QUERY, "N/A"):
        enc = encode(lm.tokenizer, [d.text for d in DOCS], q, spec, ("", ""), spec.instruction)
        with torch.no_grad():
            att = model(enc.input_ids, output_attentions=True).attentions
        rows.append((sum(a[0, :, enc.q_start:enc.q_end].mean(1).sum(0) for a in att), enc))
    (s_q, enc), (s_na, _) = rows
    assert got == pytest.approx(document_scores(s_q[: enc.q_start] - s_na[: enc.q_start], enc.doc_spans), abs=1e-5)


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    from tiny_models import tiny_configs

    return {name: save_tiny_checkpoint(tmp_path_factory.mktemp(name), name) for name in tiny_configs()}


LONG_DOCS = [Document(str(i), "", " ".join(["the cells protein gene expression of patients"] * (1 + i % 3)))
             for i in range(6)]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3", "granite"])
@pytest.mark.parametrize("heads,keep", [(None, None), ([(0, 1), (2, 3), (1, 0)], None), ([(0, 1), (2, 3), (1, 0)], 3)])
def test_one_pass_equals_two_passes_and_the_eager_reference(arch_dirs, arch, heads, keep):
    """Real and N/A query rows in one forward (tree attention) give the two-pass scores: Mistral's window (16) and
    Gemma-3's sliding layers (12) are far shorter than these prompts, so the windows are exercised."""
    tiny = arch_dirs[arch]
    spec = PromptSpec()
    lm = load(tiny, keep=keep)
    one = AttentionReranker(lm, spec, heads, template="plain", one_pass=True)
    two = AttentionReranker(lm, spec, heads, template="plain", one_pass=False)
    scored_one, scored_two = one.score(QUERY, LONG_DOCS), two.score(QUERY, LONG_DOCS)
    got_one, got_two = scored_one.scores, scored_two.scores
    assert got_one == pytest.approx(got_two, abs=1e-5)
    enc = encode(lm.tokenizer, [d.text for d in LONG_DOCS], QUERY, spec, ("", ""), spec.instruction)
    na = encode(lm.tokenizer, [d.text for d in LONG_DOCS], "N/A", spec, ("", ""), spec.instruction)
    assert scored_one.stats.pass_tokens == [enc.q_end + na.q_end - na.q_start]  # one forward per query
    assert len(scored_two.stats.pass_tokens) >= 2 and enc.q_start > 16
    # and both equal the eager reference: separate full forwards with output_attentions
    model = AutoModel.from_pretrained(tiny, attn_implementation="eager").eval()
    rows = []
    for e in (enc, na):
        with torch.no_grad():
            att = model(e.input_ids, output_attentions=True).attentions
        hs = heads or [(l, h) for l in range(4) for h in range(4)]
        rows.append(sum(att[l][0, h, e.q_start:e.q_end].mean(0) for l, h in hs))
    ref = document_scores(rows[0][: enc.q_start] - rows[1][: enc.q_start], enc.doc_spans)
    assert got_one == pytest.approx(ref, abs=1e-5)
