"""The heads study's new parts against hand computations: layer bands and the window chosen on detection data, CoRe's
length-bias test, and the head atlas (its ICR and single-head cells equal what a job computes for the same heads)."""

import numpy as np
import pytest

from corexp.components import heads as H
from corexp.data.datasets import Ranking
from corexp.data.evaluation import gold_above_longest

from helpers import build_job
from tiny_models import save_tiny_checkpoint


def test_layer_bands_and_their_truncation():
    band = H.LayerHeads(start=2, end=4).select(H.SelectionContext(6, 3))
    assert band.heads == [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)] and band.deepest_layer == 3
    assert H.LayerHeads(start=4).select(H.SelectionContext(6, 2)).heads == [(4, 0), (4, 1), (5, 0), (5, 1)]
    with pytest.raises(H.CorexpError, match="heads.start=3 heads.end=3 is not a band"):
        H.LayerHeads(start=3, end=3).check_dims(6, 3)
    job = build_job(["heads=layers", "heads.start=2", "heads.end=4"])
    assert job.truncation.keep(6, band.deepest_layer) == 4  # truncation=auto runs only the layers below `end`


def test_the_window_is_the_best_mean_reciprocal_rank_on_detection_data():
    rng = np.random.default_rng(0)
    masses = rng.uniform(0, 0.05, size=(6, 5, 2, 4))  # instances, layers, heads, documents
    pos = np.array([0, 1, 2, 3, 0, 1])
    for layer in (2, 3):  # layers 2 and 3 put their mass on the positive ...
        masses[np.arange(6), layer, :, pos] += 0.2
    for layer in (0, 1, 4):  # ... the others more of it on a wrong document: only the window [2, 4) ranks it first
        masses[np.arange(6), layer, :, (pos + 1) % 4] += 0.3
    scores = H.window_scores(masses, pos, 2)
    by_hand = []
    for start in range(4):
        s = masses[:, start:start + 2].sum(axis=(1, 2))
        ranks = [1 + (s[i] > s[i, pos[i]]).sum() + 0.5 * ((s[i] == s[i, pos[i]]).sum() - 1) for i in range(6)]
        by_hand.append(np.mean([1 / r for r in ranks]))
    assert scores == pytest.approx(by_hand) and int(np.argmax(scores)) == 2
    sel = H.WindowHeads(width=2).select(H.SelectionContext(5, 2, detection=H.DetectionTable(masses, pos)))
    assert sel.window == (2, 4) and sel.heads == [(2, 0), (2, 1), (3, 0), (3, 1)]


def test_gold_above_the_longest_non_relevant_candidate():
    words = {"a": 10, "b": 200, "c": 40, "d": 20}
    rels = {"a": 2, "c": 0}
    assert gold_above_longest(Ranking([("a", 3.0), ("b", 2.0), ("c", 1.0), ("d", 0.0)]), rels, words) == (1.0, 10 / 200)
    assert gold_above_longest(Ranking([("b", 3.0), ("a", 2.0), ("c", 1.0), ("d", 0.0)]), rels, words) == (0.0, 10 / 200)
    assert gold_above_longest(Ranking([("a", 1.0), ("c", 0.0)]), {"a": 1, "c": 1}, words) is None  # no non-relevant one
    assert gold_above_longest(Ranking([("b", 1.0), ("d", 0.0)]), rels, words) is None  # no relevant candidate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


def test_the_atlas_scores_head_sets_as_a_job_does(tiny, tmp_path):
    """ICR and a single head from the atlas equal the nDCG@10 of the jobs with those heads (same queries, same ranking
    rule); layers and windows sum their heads' token scores before the mask, as a job with heads=layers does."""
    from corexp.data.evaluation import evaluate
    from corexp.pipeline.atlas import compute
    from corexp.pipeline.run import build_reranker, load_eval_data, rerank_queries

    args = [f"model.path={tiny}", "model.gguf=null", "model.template=plain", "model.name=tiny", "prompt.max_words=20",
            "data.max_queries=4", "first_stage.depth=5", f"paths.cache_dir={tmp_path}/cache", "readout_cache=true"]
    atlas = compute(build_job([*args, "heads=all"]), widths=(1, 2), k=3)
    assert (atlas.n_layers, atlas.n_heads, len(atlas.heads), atlas.queries) == (4, 4, 16, 4)

    def job_ndcg(extra, heads=None):
        job = build_job([*args, *extra])
        data = load_eval_data(job)
        rr, _ = build_reranker(job, heads=heads, eval_qids=data.qids)
        return evaluate(data.ds.qrels, rerank_queries(job, data, [rr]).run, list(job.measures)).means["nDCG@10"]

    sets = atlas.sets.set_index("head set")["nDCG@10"]
    assert sets["ICR (all heads)"] == pytest.approx(job_ndcg(["heads=all"]))
    one = atlas.heads[(atlas.heads["layer"] == 2) & (atlas.heads["head"] == 1)]["nDCG@10"].iloc[0]
    assert one == pytest.approx(job_ndcg(["heads=all"], heads=[(2, 1)]))
    band = atlas.windows[(atlas.windows["width"] == 2) & (atlas.windows["start"] == 1)]["nDCG@10"].iloc[0]
    assert band == pytest.approx(job_ndcg(["heads=layers", "heads.start=1", "heads.end=3"]))
    assert atlas.layers["nDCG@10"].iloc[3] == pytest.approx(job_ndcg(["heads=layers", "heads.start=3", "heads.end=4"]))
    oracle = sets["oracle top-3 (upper bound)"]
    assert 0 <= oracle <= 1 and atlas.heads["rank"].min() == 1
