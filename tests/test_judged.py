"""Head detection on judged re-ranking prompts (components/judged.py): instances, metrics against references,
cross-validation folds, the overlap refusal, and both commands end to end (tiny model, real Hydra CLI, MLflow)."""

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
from test_e2e import run_cli, tiny_model_args

from corexp.components import heads as H
from corexp.components.judged import JudgedQuery, assign_folds, check_disjoint, ideal_dcg10, judged_table
from corexp.errors import CorexpError


def judged_queries(rng, n=6, layers=2, heads=3):
    out = []
    for i in range(n):
        d = int(rng.integers(5, 13))  # candidate lists of different lengths: padding
        gains = rng.choice([0, 0, 0, 1, 2, 3], size=d)
        if i == n - 1:
            gains[:] = 0  # a query without a relevant candidate gives no instance
        ids = tuple(f"q{i}d{j}" for j in rng.permutation(d))
        extra = {f"q{i}judged-elsewhere": 2}  # judged relevant, not among the candidates: only the ideal DCG sees it
        judgments = {**{doc: int(g) for doc, g in zip(ids, gains)}, **extra}
        out.append((JudgedQuery(f"q{i}", rng.normal(size=(layers, heads, d)), rng.normal(size=(layers, heads, d)), ids,
                                gains, ideal_dcg10(judgments)), judgments))
    return out


def test_judged_contrast_is_each_positive_against_the_non_relevant_candidates():
    rng = np.random.default_rng(0)
    queries = judged_queries(rng)
    table = judged_table([q for q, _ in queries])
    tau = 0.1
    got = H.core_scores(table.contrast_masses(), table.pos_index, tau)
    probs = []
    for q, _ in queries:
        negatives = [j for j, g in enumerate(q.gains) if g <= 0]
        for p in q.positives:  # softmax of the positive among itself and the non-relevant candidates, by hand
            z = q.masses[:, :, [p, *negatives]] / tau
            probs.append(np.exp(z[..., 0]) / np.exp(z).sum(axis=-1))
    assert table.instances == len(probs) == sum(len(q.positives) for q, _ in queries)
    np.testing.assert_allclose(got, np.mean(probs, axis=0), rtol=1e-6)
    # QR-R / QRHead-lme: the positive's value; the window's MRR never counts another relevant candidate or padding
    np.testing.assert_allclose(H.qr_r_scores(table.masses, table.pos_index),
                               np.mean([q.masses[..., p] for q, _ in queries for p in q.positives], axis=0), rtol=1e-5, atol=1e-7)
    ranks = []
    for q, _ in queries:
        negatives = [j for j, g in enumerate(q.gains) if g <= 0]
        summed = q.masses.sum(axis=1)[0:2].sum(axis=0)  # the window [0, 2): every head of layers 0 and 1
        ranks += [1 / (1 + sum(summed[j] > summed[p] for j in negatives)) for p in q.positives]
    assert H.window_scores(table.contrast_masses(), table.pos_index, 2)[0] == pytest.approx(np.mean(ranks))


def test_judged_qrhead_beir_is_each_heads_graded_ndcg10_per_query_as_ir_measures_computes_it():
    import ir_measures

    rng = np.random.default_rng(3)
    queries = judged_queries(rng)
    table = judged_table([q for q, _ in queries])
    got = H.qrhead_beir_scores(table.scores, table.pos_index, table.doc_ids, table.gains, table.valid, table.ideal,
                               table.query_of)
    usable = [(q, j) for q, j in queries if q.positives]  # a query without relevant candidates has no instance
    for layer in range(2):
        for head in range(3):
            run = {q.query_id: {d: float(q.scores[layer, head, i]) for i, d in enumerate(q.doc_ids)} for q, _ in usable}
            qrels = {q.query_id: j for q, j in usable}
            ref = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, run)[ir_measures.nDCG @ 10]
            assert got[layer, head] == round(ref, 5)


def test_judged_table_refuses_queries_without_a_relevant_candidate():
    rng = np.random.default_rng(0)
    q, _ = judged_queries(rng, n=1)[0]
    with pytest.raises(CorexpError, match="has a judged-relevant candidate"):
        judged_table([q])


def test_folds_partition_the_queries_seeded_and_balanced():
    qids = [str(i) for i in range(43)]
    folds = assign_folds(qids, 5, 0)
    assert sorted(folds) == sorted(qids)
    sizes = np.bincount(list(folds.values()))
    assert sizes.tolist() == [9, 9, 9, 8, 8]
    assert assign_folds(list(reversed(qids)), 5, 0) == folds  # the order they come in does not matter
    assert assign_folds(qids, 5, 1) != folds
    with pytest.raises(CorexpError, match="detection.folds=50 is more than the 43"):
        assign_folds(qids, 50, 0)


def test_an_overlap_of_detection_and_evaluation_queries_is_refused_in_one_line():
    check_disjoint(["1", "2"], ["3"])
    with pytest.raises(CorexpError) as err:
        check_disjoint(["1", "2", "3"], ["3", "4"], " of fold 2")
    assert "\n" not in str(err.value) and "overlap the evaluation queries of fold 2 (1, e.g. '3')" in str(err.value)


# -- end to end: the tiny model through the real CLI ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tiny):
    return tiny


def runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=["corexp"], output_format="list")


def test_crossval_scores_each_query_only_with_heads_detected_without_it(tmp_path, tiny_dir):
    run_cli(tmp_path, *tiny_model_args(tiny_dir), "data.max_queries=12", "first_stage.depth=6", "detection=crossval",
            "detection.folds=3", "heads=core", "heads.k=3", f"tracking.artifact_location={tmp_path}/artifacts")
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert "3-fold CV" in run.info.run_name
    assert run.data.params["detection.instances"] == "judged" and run.data.params["detection.folds"] == "3"
    art = Path(run.info.artifact_uri.removeprefix("file://"))
    folds = json.loads((art / "heads_by_fold.json").read_text())["folds"]
    scored = [set(f["scored"]) for f in folds]
    assert len(set().union(*scored)) == sum(len(s) for s in scored) == 12  # the folds partition the 12 queries
    for f in folds:
        assert not set(f["detected_on"]) & set(f["scored"])
        assert len(f["heads"].split(",")) == 3
    assert run.data.params["selected_heads"] == " | ".join(f["heads"] for f in folds)
    assert math.isfinite(run.data.metrics["rerank.nDCG_at_10"])
    # every query's scores are those of its fold's heads (re-scored from the read-out tables the job stored)
    import pandas as pd

    from corexp.pipeline.run import build_reranker, load_eval_data

    from helpers import build_job

    job = build_job([*tiny_model_args(tiny_dir), "data.max_queries=12", "first_stage.depth=6", "heads=all",
                     f"paths.cache_dir={tmp_path}/cache", "readout_cache=true"])
    data = load_eval_data(job)
    rows = pd.read_csv(art / "scores.csv", dtype={"query_id": str, "doc_id": str})
    for f in folds:
        heads = [H.parse_head(h) for h in f["heads"].split(",")]
        rr, _ = build_reranker(job, heads=heads, eval_qids=data.qids)
        for qid in f["scored"]:
            ids = data.candidates.top[qid].ids
            docs = data.ds.docs.get_many(ids)
            scored_ = rr.score(data.ds.queries[qid], [docs[d] for d in ids], qid)
            assert scored_.stats.cached  # read from the table the cross-validation job stored
            logged = rows[rows.query_id == qid].set_index("doc_id")["attention_score"]
            np.testing.assert_allclose([logged[d] for d in ids], scored_.scores, rtol=1e-6, atol=1e-9)


def test_judged_detection_on_the_evaluation_data_itself_is_refused(tmp_path, tiny_dir):
    proc = run_cli(tmp_path, *tiny_model_args(tiny_dir), "data.max_queries=4", "first_stage.depth=4", "heads=core",
                   "detection=judged", "detection.name=scifact-sample", "detection.local_dir=${corexp_resource:scifact_sample}",
                   expect_ok=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("corexp: error")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "detection queries overlap the evaluation queries (4, e.g." in lines[0] and "detection=crossval" in lines[0]
    assert not runs(tmp_path) or all(r.info.status != "FINISHED" for r in runs(tmp_path))


def test_detect_on_one_data_set_evaluate_on_another(tmp_path, tiny_dir):
    """The README's command, shrunk: heads detected on the SciFact sample's train queries, re-ranking its test queries."""
    run_cli(tmp_path, *tiny_model_args(tiny_dir), "data.max_queries=4", "first_stage.depth=5", "heads=qrhead", "heads.k=4",
            "detection=judged", "detection.name=scifact-train-sample", "detection.split=train",
            "detection.local_dir=${corexp_resource:scifact_sample}", "detection.num_queries=6",
            f"tracking.artifact_location={tmp_path}/artifacts")
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and "detected on scifact-train-sample" in run.info.run_name
    heads = run.data.params["selected_heads"].split(",")
    assert len(heads) == 4
    art = Path(run.info.artifact_uri.removeprefix("file://"))
    selected = json.loads((art / "selected_heads.json").read_text())
    assert selected["metric"] == "qrhead" and [f"{h['layer']}-{h['head']}" for h in selected["heads"]] == heads
