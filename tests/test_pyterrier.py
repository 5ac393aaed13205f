"""PyTerrier: corexp's re-ranker as a transformer in `first_stage >> reranker`, compared by pt.Experiment, no Java."""

import math

import pytest

pt = pytest.importorskip("pyterrier")

from corexp.components.first_stage import candidates  # noqa: E402
from corexp.config import RESOURCES_DIR  # noqa: E402
from corexp.data.datasets import load_local, select_queries  # noqa: E402


@pytest.mark.slow
def test_pt_experiment_over_a_supplied_run_with_real_smollm2():
    import pandas as pd
    from ir_measures import nDCG

    from corexp.pyterrier import CorexpReranker, results_frame

    ds = load_local(RESOURCES_DIR / "scifact_sample", "test", "sample")
    qids = select_queries(ds, 3)
    run = {q: r for q, r in candidates(ds.run, 6).items() if q in qids}
    frame = results_frame(run, ds.queries, ds.docs)
    first_stage = pt.Transformer.from_df(frame)
    heads = [(3, 1), (7, 2), (12, 0)]
    rr = CorexpReranker.from_config("smollm2", heads=heads, overrides=["model.device=cpu"])
    assert rr.reranker.lm.kept_layers == 13  # layers above the deepest head are not loaded
    topics = pd.DataFrame({"qid": qids, "query": [ds.queries[q] for q in qids]})
    qrels = pd.DataFrame([{"qid": q, "docno": d, "label": r} for q in qids for d, r in ds.qrels[q].items()])
    res = pt.Experiment([first_stage, first_stage >> rr], topics, qrels, eval_metrics=[nDCG @ 10], names=["BM25", "corexp"])
    assert list(res["name"]) == ["BM25", "corexp"] and all(math.isfinite(v) for v in res["nDCG@10"])
    # the transformer's scores are the re-ranker's, and its ranking a permutation of the candidates
    out = (first_stage >> rr).transform(topics)
    for q in qids:
        got = out[out.qid == q]
        assert sorted(got.docno) == sorted(d for d, _ in run[q]) and list(got["rank"]) == list(range(len(run[q])))
        found = ds.docs.get_many([d for d, _ in run[q]])
        expected = rr.reranker.score(ds.queries[q], [found[d] for d, _ in run[q]], q).scores
        assert dict(zip(got.docno, got.score)) == pytest.approx(dict(zip([d for d, _ in run[q]], expected)), abs=1e-6)
    assert not pt.java.started()  # this path never needs Java
