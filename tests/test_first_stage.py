import dataclasses

import ir_measures
import pytest

from corexp.components.first_stage import candidates
from corexp.config import build
from corexp.data.datasets import load_local
from corexp.errors import CorexpError

from helpers import compose_cfg


def first_stage(*overrides):
    return build(compose_cfg(list(overrides)).first_stage, "first_stage").component


def test_bm25_on_scifact_matches_anserini(shared_data, tmp_path):
    """bm25s with the default first_stage config lands within 0.005 nDCG@10 of Anserini's 0.6789."""
    ds = load_local(shared_data / "scifact", "test", "scifact")
    ref = {}
    for line in (shared_data / "scifact" / "bm25.reference-eval.txt").read_text().splitlines():
        m, q, v = line.split()
        if m == "ndcg_cut_10" and q != "all":
            ref[q] = float(v)
    assert abs(sum(ref.values()) / len(ref) - 0.6789) < 5e-4
    bm25 = first_stage("first_stage=bm25")
    run, label = bm25.retrieve(ds, sorted(ds.queries), tmp_path, progress=False)
    assert label == "bm25s" and len(list((tmp_path / "runs").glob("*.trec"))) == 1
    score = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], ds.qrels, {q: dict(v) for q, v in run.items()})
    assert abs(score[ir_measures.nDCG @ 10] - 0.6789) <= 0.005
    again, _ = bm25.retrieve(ds, sorted(ds.queries), tmp_path, progress=False)  # from the cache
    assert [d for d, _ in again["1"]] == [d for d, _ in run["1"]]


def test_dataset_run_is_used_when_present(shared_data, tmp_path):
    ds = load_local(shared_data / "dl19", "test", "dl19")
    auto = first_stage()
    run, label = auto.retrieve(ds, sorted(ds.queries), tmp_path, progress=False)
    assert label == "dataset-run" and all(len(v) == 100 for v in run.values())
    cands = auto.candidates(ds, sorted(ds.queries), tmp_path, progress=False)
    assert all(len(v) == 20 for v in cands.top.values()) and (cands.label, cands.provenance) == ("BM25", "dataset-run")
    with pytest.raises(CorexpError, match="has no first-stage run"):
        first_stage("first_stage=run").retrieve(dataclasses.replace(ds, run=None), sorted(ds.queries), tmp_path)


def test_drop_self_hits():
    run = {"q": [("q", 9.0), ("a", 5.0), ("b", 1.0)]}
    assert candidates(run, 2, drop_self=True) == {"q": [("a", 5.0), ("b", 1.0)]}
