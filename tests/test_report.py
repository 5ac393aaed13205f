"""The paper pipeline's configuration and the report's BEIR averaging, missing cells and sweep table."""

import numpy as np
import pandas as pd
import pytest

from corexp.report import BEIR_15, CQA_FORUMS, build_tables, missing_cells, sweep_table
from helpers import compose_cfg


def test_paper_core_resolves_to_the_papers_setting():
    cfg = compose_cfg(["experiment=paper_core"], return_hydra_config=True)
    assert cfg.first_stage.source == "dense" and cfg.first_stage.encoder.hf_id == "ibm-granite/granite-embedding-30m-english"
    assert cfg.first_stage.depth == 40 and cfg.prompt.max_words == 300 and cfg.prompt.name == "core_official"
    det = cfg.detection
    assert (det.name, det.num_queries, det.num_negatives, det.positions) == ("nq-train", 1000, 49, 5)
    params = cfg.hydra.sweeper.params
    assert params.model == "mistral,llama,granite" and params.heads == "all,qrhead,core"
    data = params.data.split(",")
    groups = {"cqadupstack" if d.startswith("cqadupstack-") else d for d in data}
    assert len(groups) == 17 and groups == set(BEIR_15) | {"dl19", "dl20"}
    assert sorted(d.split("-", 1)[1] for d in data if d.startswith("cqadupstack-")) == sorted(CQA_FORUMS)
    for d in data:  # every data option exists and composes
        assert compose_cfg([f"data={d}"]).data.name == d or d == "cqadupstack"


def _row(model, method, dataset, value, fs=0.5, metric="core", extra=None):
    params = {"heads.metric": metric, "heads.k": "8", "model.tau": "0.1", "data.name": dataset, "model.name": model,
              **(extra or {})}
    return {"run_id": "none", "start": 0, "model": model, "dataset": dataset, "method": method, "first_stage": "BM25",
            "params": params, "metrics": {"rerank.nDCG_at_10": value, "first_stage.nDCG_at_10": fs}, "queries": 10.0}


def test_beir_average_counts_cqadupstack_forums_as_one_set():
    rng = np.random.default_rng(0)
    sets = [d for d in BEIR_15 if d != "cqadupstack"] + [f"cqadupstack-{f}" for f in CQA_FORUMS] + ["dl19"]
    values = {d: float(rng.uniform(0.2, 0.8)) for d in sets}
    df = pd.DataFrame([_row("m", "CoRe-k8 τ=0.1", d, v) for d, v in values.items()])
    table = build_tables(df, "nDCG@10")["m"]
    cqa = np.mean([values[f"cqadupstack-{f}"] for f in CQA_FORUMS])
    assert table.loc["CoRe-k8 τ=0.1", "cqadupstack"] == f"{100 * cqa:.1f}"
    beir = np.mean([values[d] for d in BEIR_15 if d != "cqadupstack"] + [cqa])  # 15 numbers, the forums as one
    assert table.loc["CoRe-k8 τ=0.1", "BEIR-15"] == f"{100 * beir:.1f}"
    assert table.loc["BM25", "BEIR-15"] == "50.0" and "dl19" in table.columns
    # one forum short: no cqadupstack number, hence no BEIR-15 average (never a partial one)
    short = build_tables(df[df.dataset != "cqadupstack-tex"], "nDCG@10")["m"]
    assert short.loc["CoRe-k8 τ=0.1", "cqadupstack"] == "" and short.loc["CoRe-k8 τ=0.1", "BEIR-15"] == ""


def test_missing_cells_are_listed():
    df = pd.DataFrame([_row("a", "ICR", "dl19", .4, metric="all"), _row("a", "CoRe-k8", "dl19", .5),
                       _row("b", "ICR", "dl19", .3, metric="all")])
    assert missing_cells(df) == ["b × CoRe-k8 × dl19"]
    assert missing_cells(df, ["a,b,c:dl19", "a:nq"]) == ["a × CoRe-k8 × nq", "a × ICR × nq", "b × CoRe-k8 × dl19",
                                                        "c × CoRe-k8 × dl19", "c × ICR × dl19"]


def test_sweep_table_is_relative_to_no_truncation():
    rows = []
    for frac, ndcg, lat, mem, kept in ((0.0, .5, 2.0, 400, 30), (0.5, .45, 1.0, 200, 15)):
        r = _row("m", "x", "dl19", ndcg, extra={"truncation.mode": "fraction", "truncation.fraction": str(frac)})
        r["metrics"].update(latency_mean_s=lat, peak_memory_mb=mem, kept_layers=kept)
        rows.append(r)
    t = sweep_table(pd.DataFrame(rows), "truncation.fraction", "nDCG@10")
    assert list(t["kept_layers"]) == [30, 15] and t["method"].nunique() == 1
    assert list(t["latency_s rel."]) == [1.0, 0.5] and list(t["nDCG@10 rel."]) == pytest.approx([1.0, 0.9])
