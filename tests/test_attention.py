"""The read-out must equal eager attention rows exactly (up to fp32 round-off), for every architecture."""

import pytest
import torch

from corexp.engine.attention import Readout, recording

from tiny_models import tiny_configs, tiny_model

ARCHS = list(tiny_configs())


def eager_rows(name: str, ids: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    model = tiny_model(name, attn="eager")
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return torch.stack([a[0, :, rows[0]:rows[1]].mean(dim=1) for a in out.attentions])  # (L, H, n)


@pytest.mark.parametrize("name", ARCHS)
def test_readout_equals_eager_attention(name):
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (1, 40))
    rows = (30, 38)
    ref = eager_rows(name, ids, rows)
    model = tiny_model(name)
    rec = Readout(heads=None, rows=rows)
    with torch.no_grad(), recording(rec):
        model(ids)
    got = torch.stack([rec.layers[l] for l in range(len(rec.layers))])
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_readout_with_kv_cache_prefix_matches_full_pass(name):
    """Second pass over the suffix only (prefix in the KV cache) reads the same rows as one full pass."""
    torch.manual_seed(2)
    ids = torch.randint(5, 300, (1, 48))
    prefix = 33
    rows = (35, 45)
    ref = eager_rows(name, ids, rows)
    model = tiny_model(name)
    with torch.no_grad():
        out = model(ids[:, :prefix], use_cache=True)
        rec = Readout(heads={1: [0, 3], 2: [2]}, rows=(rows[0] - prefix, rows[1] - prefix), past_len=prefix)
        with recording(rec):
            model(ids[:, prefix:], cache=out.past_key_values, use_cache=True)
    assert sorted(rec.layers) == [1, 2]
    torch.testing.assert_close(rec.layers[1], ref[1, [0, 3]], atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.layers[2], ref[2, [2]], atol=1e-5, rtol=0)


def test_readout_inactive_leaves_outputs_unchanged():
    torch.manual_seed(3)
    ids = torch.randint(5, 300, (1, 20))
    a = tiny_model("llama", attn="sdpa")
    b = tiny_model("llama")
    with torch.no_grad():
        ha = a(ids).last_hidden_state
        with recording(Readout(None, (10, 20))):
            hb = b(ids).last_hidden_state
    torch.testing.assert_close(ha, hb)
