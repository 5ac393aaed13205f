import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corexp.components.fusion import LinearFusion, NoFusion, RRFFusion
from corexp.engine.scoring import document_scores, rank, trec_scores


def reference_score(values):
    t = torch.tensor(values, dtype=torch.float64)
    thr = t.mean() - 2 * t.std(unbiased=True)
    return float(t[t > thr].sum())


def test_mask_drops_outliers_below_mean_minus_two_sigma():
    c = torch.tensor([1.0] * 10 + [-50.0])
    (s,) = document_scores(c, [(0, 11)])
    assert s == reference_score(c.tolist()) == 10.0


def test_one_token_and_empty_documents_are_finite():
    c = torch.tensor([0.5, 2.0, 3.0])
    assert document_scores(c, [(0, 1), (1, 1), (1, 3)]) == [0.5, 0.0, reference_score([2.0, 3.0])]


def test_identical_tokens_score_zero_not_nan():
    # std 0 -> threshold = mean -> strict '>' keeps none: score 0, never NaN
    assert document_scores(torch.tensor([0.3, 0.3, 0.3]), [(0, 3)]) == [0.0]


def test_ties_break_by_first_stage_rank():
    assert [d for d, _ in rank(["a", "b", "c"], [1.0, 2.0, 1.0])] == ["b", "a", "c"]


def test_trec_scores_strictly_decreasing():
    out = trec_scores([("x", 1.0), ("y", 1.0), ("z", 0.0)])
    assert [s for _, s in out] == sorted({s for _, s in out}, reverse=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=0, max_size=6), min_size=1, max_size=8))
def test_any_input_gives_finite_scores_and_a_permutation(docs):
    flat, spans, pos = [], [], 0
    for d in docs:
        flat += d
        spans.append((pos, pos + len(d)))
        pos += len(d)
    scores = document_scores(torch.tensor(flat, dtype=torch.float32), spans)
    assert all(math.isfinite(s) for s in scores)
    ids = [f"d{i}" for i in range(len(docs))]
    ranked = rank(ids, scores)
    assert sorted(d for d, _ in ranked) == sorted(ids)
    first = list(range(len(ids), 0, -1))
    for fusion in (LinearFusion(0.5), RRFFusion(60)):
        fused = fusion.fuse(ids, scores, first)
        assert all(math.isfinite(s) for s in fused) and len(fused) == len(ids)
    assert NoFusion().fuse(ids, scores, first) == scores


def test_fusion_formulas():
    ids, attn, first = ["a", "b", "c"], [0.2, 0.9, 0.5], [3.0, 2.0, 1.0]
    assert LinearFusion(1.0).fuse(ids, attn, first) == pytest.approx([0.0, 1.0, 3 / 7])
    assert LinearFusion(0.0).fuse(ids, attn, first) == pytest.approx([1.0, 0.5, 0.0])
    # attention ranks b, c, a; first-stage ranks a, b, c
    assert RRFFusion(60).fuse(ids, attn, first) == pytest.approx([1 / 63 + 1 / 61, 1 / 61 + 1 / 62, 1 / 62 + 1 / 63])


def test_per_head_document_scores_are_the_document_scores_of_each_head_alone():
    """QRHead's detection scores a head as it re-ranks with that head alone: the same mask and sum per row."""
    from corexp.engine.scoring import head_document_scores

    g = torch.Generator().manual_seed(3)
    c = torch.randn((7, 60), generator=g) * 1e-3
    c[2] = 0.0  # a silent head: every token on the threshold, score 0
    spans = [(0, 1), (1, 13), (13, 13), (13, 40), (40, 60)]
    got = head_document_scores(c, spans)
    assert got.shape == (7, 5) and torch.isfinite(got).all()
    for row in range(7):
        np.testing.assert_allclose(got[row].numpy(), document_scores(c[row], spans), rtol=1e-5, atol=1e-9)
