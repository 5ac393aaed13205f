import numpy as np
import pytest

from corexp.components import heads as H
from corexp.components.detection import build_instances
from corexp.config import RESOURCES_DIR
from corexp.data.datasets import load_local
from corexp.errors import CorexpError

from helpers import build_job


def masses_fixture():
    rng = np.random.default_rng(0)
    m = rng.random((6, 3, 4, 5)).astype(np.float32)  # instances, layers, heads, docs
    pos = rng.integers(0, 5, size=6)
    return m, pos


def test_qr_r_and_qrhead_lme_scores_are_the_mean_value_on_the_positive():
    """QR-R on raw masses (CoRe's qr_detector.py), QRHead's long-context QRScore on calibrated, masked scores."""
    m, pos = masses_fixture()
    expected = np.mean([m[i, :, :, pos[i]] for i in range(6)], axis=0)
    np.testing.assert_allclose(H.qr_r_scores(m, pos), expected, rtol=1e-6)
    np.testing.assert_allclose(H.qrhead_lme_scores(m - 0.5, pos), expected - 0.5, rtol=1e-6)


def test_qrhead_beir_score_is_the_mean_ndcg_at_10_of_each_heads_rankings():
    """nDCG@10 by hand (one relevant document: 1/log2(rank+1), 0 below rank 10) against ir_measures on the same runs;
    ties between documents go to the larger document id, as trec_eval breaks them."""
    import ir_measures

    rng = np.random.default_rng(1)
    scores = rng.random((5, 2, 3, 14)).astype(np.float32)
    scores[0, 0, 0, :] = 0.25  # all tied: trec_eval ranks by descending id
    pos = np.array([0, 13, 4, 7, 2])
    ids = np.array([[f"d{j:02d}" for j in rng.permutation(14)] for _ in range(5)])
    got = H.qrhead_beir_scores(scores, pos, ids)
    for layer in range(2):
        for head in range(3):
            run = {f"q{i}": {ids[i, d]: float(scores[i, layer, head, d]) for d in range(14)} for i in range(5)}
            qrels = {f"q{i}": {ids[i, pos[i]]: 1} for i in range(5)}
            ref = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, run)[ir_measures.nDCG @ 10]
            assert got[layer, head] == round(ref, 5)
    by_hand = np.mean([1 / np.log2(r + 1) if r <= 10 else 0.0 for r in
                       [1 + int((scores[i, 1, 2] > scores[i, 1, 2, pos[i]]).sum()) for i in range(5)]])
    assert got[1, 2] == round(by_hand, 5)


def test_qrhead_beir_shuffles_detection_documents_like_its_driver():
    """random.seed(42) once, then random.shuffle of each instance's documents; the positive follows its document."""
    import random

    from corexp.components.detection import shuffle_documents

    insts = [{"query_id": str(q), "docs": [f"{q}-{j}" for j in range(20)], "pos_index": q % 20} for q in range(4)]
    out = shuffle_documents(insts, H.QRHEAD_BEIR_SEED)
    random.seed(42)
    for before, after in zip(insts, out):
        expected = list(before["docs"])
        random.shuffle(expected)
        assert after["docs"] == expected and after["docs"][after["pos_index"]] == before["docs"][before["pos_index"]]
    assert H.QRHeads().detection_shuffle == 42 and H.QRHeads(variant="lme").detection_shuffle is None
    assert H.CoReHeads().detection_shuffle is None and H.QRRHeads().detection_shuffle is None


@pytest.mark.parametrize("tau", [0.001, 0.1, 10.0])
def test_core_score_is_mean_softmax_probability_of_positive(tau):
    m, pos = masses_fixture()
    expected = np.zeros((3, 4))
    for i in range(6):
        for l in range(3):
            for h in range(4):
                z = np.exp((m[i, l, h] - m[i, l, h].max()) / tau)
                expected[l, h] += z[pos[i]] / z.sum() / 6
    np.testing.assert_allclose(H.core_scores(m, pos, tau), expected, rtol=1e-6, atol=1e-12)


def test_small_tau_counts_how_often_positive_wins():
    m, pos = masses_fixture()
    wins = np.mean([m[i, :, :, pos[i]] == m[i].max(axis=-1) for i in range(6)], axis=0)
    np.testing.assert_allclose(H.core_scores(m, pos, 1e-6), wins, atol=1e-6)


def test_top_k_random_published_and_errors():
    scores = np.array([[0.1, 0.9], [0.5, 0.9]])
    assert H.top_k(scores, 3) == [(0, 1), (1, 1), (1, 0)]
    assert H.top_k(scores, 1, max_layer=1) == [(0, 1)]
    assert H.random_heads(4, 4, 5, seed=1) == H.random_heads(4, 4, 5, seed=1)
    published = H.SelectionContext(32, 32, published=build_job(["model=mistral"]).model.published_heads)
    assert H.PublishedHeads(k=2).select(published).heads == [(15, 21), (15, 1)]
    for bad in (0, 5):
        with pytest.raises(CorexpError, match="out of range"):
            H.top_k(scores, bad)
    with pytest.raises(CorexpError, match="no published head list"):
        H.PublishedHeads(k=8).select(H.SelectionContext(30, 9))


def test_jaccard_and_layer_stats():
    assert H.jaccard([(1, 2), (3, 4)], [(3, 4), (5, 6)]) == pytest.approx(1 / 3)
    st = H.layer_stats([(0, 0), (10, 1), (29, 2)], 30)
    assert st["layer_min"] == 0 and st["layer_max"] == 29
    assert st["share_lower_third"] == st["share_middle_third"] == st["share_upper_third"] == pytest.approx(1 / 3)


def test_detection_instances_never_use_judged_positives_as_negatives():
    cfg = build_job(["detection.positions=3"]).detection
    ds = load_local(RESOURCES_DIR / "scifact_sample", "train", "train")
    inst = build_instances(ds, ds.run, cfg)
    assert len(inst) == 3 * len({i["query_id"] for i in inst})
    for i in inst:
        rels = ds.qrels[i["query_id"]]
        pos_doc = i["docs"][i["pos_index"]]
        assert rels.get(pos_doc, 0) > 0 and len(i["docs"]) == cfg.num_negatives + 1
        assert all(rels.get(d, 0) <= 0 for j, d in enumerate(i["docs"]) if j != i["pos_index"])
    assert {i["pos_index"] for i in inst} >= {0, cfg.num_negatives}


def test_detection_folds_are_disjoint_blocks_of_one_order(shared_data, tmp_path):
    """detection.fold=i: the i-th block of num_queries eligible queries of one seeded order; folds share no query."""
    from corexp.components.detection import fold_order
    from corexp.components.first_stage import cached_bm25

    ds = load_local(shared_data / "scifact", "train", "scifact-train")
    from dataclasses import replace

    from corexp.components.detection import Detection
    from corexp.components.first_stage import BM25

    cfg = Detection(name="scifact-train", num_queries=40, fold=0)
    order = fold_order(ds, cfg)
    run = cached_bm25(ds, order[:360], BM25(), 100, tmp_path, False)
    folds = []
    for fold in range(3):
        cfg = replace(cfg, fold=fold)
        folds.append({inst["query_id"] for inst in build_instances(ds, run, cfg)})
    assert [len(f) for f in folds] == [40, 40, 40]
    assert not (folds[0] & folds[1]) and not (folds[0] & folds[2]) and not (folds[1] & folds[2])
    # block i of the eligible queries in that order, whatever the pool size
    cfg = replace(cfg, fold=1)
    assert {inst["query_id"] for inst in build_instances(ds, {q: run[q] for q in order[:240]}, cfg)} == folds[1]
    cfg = replace(cfg, fold=20)
    with pytest.raises(CorexpError, match="detection.fold=20"):
        build_instances(ds, run, cfg)
