"""Read-out cache: one forward per prompt reads every head; any head set scored from the table equals a direct forward."""

import random

import pytest

from corexp.engine.prompt import PromptSpec
from corexp.engine.readout_cache import ReadoutCache
from corexp.engine.reranker import AttentionReranker

from test_reranker import LONG_DOCS, QUERY, load
from tiny_models import save_tiny_checkpoint


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_head_sets_from_the_table_equal_direct_forwards(tmp_path, arch):
    tiny = save_tiny_checkpoint(tmp_path / arch, arch)
    spec = PromptSpec()
    lm = load(tiny)
    cache = ReadoutCache(tmp_path / "cache", "tiny-identity")
    first = AttentionReranker(lm, spec, None, template="plain", readout_cache=cache).score(QUERY, LONG_DOCS)
    assert first.scores == pytest.approx(
        AttentionReranker(lm, spec, None, template="plain").score(QUERY, LONG_DOCS).scores, abs=1e-5)
    assert cache.hits == 0 and first.stats.pass_tokens and not first.stats.cached  # computed: one forward
    rng = random.Random(0)
    for k in (1, 3, 8):
        heads = rng.sample([(l, h) for l in range(4) for h in range(4)], k)
        cached = AttentionReranker(lm, spec, heads, template="plain", readout_cache=cache).score(QUERY, LONG_DOCS)
        direct = AttentionReranker(lm, spec, heads, template="plain").score(QUERY, LONG_DOCS)
        assert cached.scores == pytest.approx(direct.scores, abs=1e-5)
        assert cached.stats.cached and cached.stats.pass_tokens == []  # no forward ran
    assert cache.hits == 3
    # a truncated model reads the same table (its layers are identical)
    cut = AttentionReranker(load(tiny, keep=2), spec, [(0, 1), (1, 2)], template="plain", readout_cache=cache)
    scored = cut.score(QUERY, LONG_DOCS)
    assert scored.scores == pytest.approx(
        AttentionReranker(load(tiny, keep=2), spec, [(0, 1), (1, 2)], template="plain").score(QUERY, LONG_DOCS).scores,
        abs=1e-5)
    assert scored.stats.cached


def test_a_table_of_fewer_layers_is_recomputed_and_replaced(tmp_path):
    tiny = save_tiny_checkpoint(tmp_path / "llama", "llama")
    spec = PromptSpec()
    cache = ReadoutCache(tmp_path / "cache", "tiny-identity")
    AttentionReranker(load(tiny, keep=2), spec, [(1, 0)], template="plain", readout_cache=cache).score(QUERY, LONG_DOCS)
    full = AttentionReranker(load(tiny), spec, [(3, 1)], template="plain", readout_cache=cache)
    assert not full.score(QUERY, LONG_DOCS).stats.cached  # the 2-layer table lacks layer 3
    again = AttentionReranker(load(tiny), spec, None, template="plain", readout_cache=cache)
    assert again.score(QUERY, LONG_DOCS).stats.cached  # the 4-layer table replaced it
    other = ReadoutCache(tmp_path / "cache", "another-model")
    fresh = AttentionReranker(load(tiny), spec, None, template="plain", readout_cache=other)
    assert not fresh.score(QUERY, LONG_DOCS).stats.cached  # keyed on the model identity


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_uncalibrated_scores_from_the_table_equal_a_direct_forward(tmp_path, arch):
    """calibrate=False scores s_j(q) alone: the table's real rows give what a forward without the N/A query gives, and
    differ from the calibrated scores."""
    tiny = save_tiny_checkpoint(tmp_path / arch, arch)
    spec = PromptSpec()
    lm = load(tiny)
    cache = ReadoutCache(tmp_path / "cache", "tiny-identity")
    AttentionReranker(lm, spec, None, template="plain", readout_cache=cache).score(QUERY, LONG_DOCS)
    heads = [(0, 1), (2, 3), (3, 0)]
    direct = AttentionReranker(lm, spec, heads, template="plain", calibrate=False).score(QUERY, LONG_DOCS)
    assert direct.stats.pass_tokens and len(direct.stats.pass_tokens) == 1  # one forward, no N/A query
    cached = AttentionReranker(lm, spec, heads, template="plain", readout_cache=cache, calibrate=False).score(QUERY, LONG_DOCS)
    assert cached.stats.cached
    assert cached.scores == pytest.approx(direct.scores, abs=1e-5)
    calibrated = AttentionReranker(lm, spec, heads, template="plain").score(QUERY, LONG_DOCS)
    assert max(abs(a - b) for a, b in zip(calibrated.scores, direct.scores)) > 1e-3
