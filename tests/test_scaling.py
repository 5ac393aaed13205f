"""The scaling report (corexp.studies.scaling): every cell, test and Jaccard it prints is recomputed here by hand from the same
per-query values; cells without runs are listed as missing."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ttest_rel

from corexp.job import Labels
from corexp.report.tables import holm
from corexp.studies import scaling

QUERIES = [f"q{i}" for i in range(12)]


def _labels(model, method, extras=()):
    return Labels(model, method, "BM25", "dl19", [{"group": g, "text": t, "without": {}} for g, t in extras])


class Store:
    """Runs as the report loads them (one row per run) and their per-query tables by run id."""

    def __init__(self):
        self.rows, self.per_query, self.rng = [], {}, np.random.default_rng(7)
        self.first_stage = pd.Series(self.rng.uniform(0.3, 0.7, len(QUERIES)), index=QUERIES)

    def add(self, model, method, extras=(), params=None, cpu=10.0, shift=0.0):
        run_id = f"r{len(self.rows)}"
        values = (self.first_stage + shift + self.rng.normal(0, 0.05, len(QUERIES))).clip(0, 1)
        self.per_query[run_id] = pd.DataFrame({"rerank.nDCG@10": values, "first_stage.nDCG@10": self.first_stage})
        self.rows.append({"run_id": run_id, "run_name": f"{model} · {method} {run_id}", "model": model, "dataset": "dl19",
                          "labels": _labels(model, method, extras), "params": params or {},
                          "metrics": {"rerank.nDCG_at_10": float(values.mean()),
                                      "first_stage.nDCG_at_10": float(self.first_stage.mean()), "cpu_time_s": cpu,
                                      "queries": float(len(QUERIES)), "readout_cache_hits": 0.0 if cpu > 100 else 12.0,
                                      "model_parameters": {"a": 1.35e8, "b": 1.5e9}[model]},
                          "queries": float(len(QUERIES))})
        return run_id, values

    def study(self, monkeypatch, models):
        monkeypatch.setattr(scaling, "per_query_or_none", lambda run_id, name, cache, unreadable: self.per_query[run_id])
        df = pd.DataFrame(self.rows)
        roles = pd.DataFrame([scaling.describe(r) for _, r in df.iterrows()], index=df.index)
        return scaling.Study(pd.concat([df, roles], axis=1), models)


@pytest.fixture
def store():
    s = Store()
    core = ["18-6", "22-7", "23-2", "17-3", "21-8", "14-3", "20-3", "23-7"]
    s.add("a", "ICR", cpu=900.0, shift=-0.1)
    s.add("a", "CoRe-k8 τ=0.1", [("truncation", "trunc=auto")], {"detection.fold": "0", "selected_heads": ",".join(core)}, shift=0.05)
    s.add("a", "CoRe-k8 τ=0.1", [("truncation", "trunc=auto")], {"detection.fold": "1",
                                                                 "selected_heads": ",".join([*core[:6], "1-1", "2-2"])})
    s.add("a", "QRHead-k8", [("truncation", "trunc=auto")], {"detection.fold": "0", "selected_heads": "0-0,0-1"})
    for seed in range(5):
        s.add("a", "random-k8", [("truncation", "trunc=auto")], {"heads.seed": str(seed)}, shift=-0.05)
    s.add("a", "CoRe-k8 τ=0.1", [("truncation", "trunc=auto"), ("fusion", "fusion=rrf")], {"detection.fold": "0"})
    s.add("a", "ICR", [("prompt", "reversed")], cpu=800.0, shift=0.02)
    s.add("a", "CoRe-k8 τ=0.1", [("prompt", "shuffled")], {"detection.fold": "0"})
    for seed in range(5):
        s.add("a", "random-k8", [("prompt", "shuffled")], {"heads.seed": str(seed)})
    return s


def test_main_table_cells_and_tests_match_a_hand_computation(store, monkeypatch):
    study = store.study(monkeypatch, ["a"])
    table, tests = scaling.main_table(study)
    name = scaling.MODEL_NAMES.get("a", "a")
    by_run = {r["run_id"]: r for r in store.rows}
    icr = store.per_query["r0"]["rerank.nDCG@10"]
    core = store.per_query["r1"]["rerank.nDCG@10"]
    draws = [store.per_query[f"r{i}"]["rerank.nDCG@10"] for i in range(4, 9)]
    random_mean = pd.concat(draws, axis=1).mean(axis=1)
    fs = store.first_stage
    # Holm over this model's tests: every method against the first stage, CoRe/QRHead against ICR and random heads
    methods = {"ICR": icr, "QRHead-k8": store.per_query["r3"]["rerank.nDCG@10"], "CoRe-k8": core,
               "random-k8": random_mean, "CoRe-k8 + RRF": store.per_query["r9"]["rerank.nDCG@10"]}
    raw = {(m, "first stage"): ttest_rel(v, fs).pvalue for m, v in methods.items()}
    for m in ("CoRe-k8", "QRHead-k8"):
        raw[(m, "ICR")] = ttest_rel(methods[m], icr).pvalue
        raw[(m, "random")] = ttest_rel(methods[m], random_mean).pvalue
    raw[("ICR", "random")] = ttest_rel(icr, random_mean).pvalue
    adjusted = holm(raw)
    core_cell = f"{100 * by_run['r1']['metrics']['rerank.nDCG_at_10']:.1f}"
    assert table.loc["CoRe-k8", name].startswith(core_cell)
    assert table.loc["CoRe-k8", name].endswith("†" if adjusted[("CoRe-k8", "first stage")] < 0.05 else core_cell[-1])
    means = 100 * np.array([by_run[f"r{i}"]["metrics"]["rerank.nDCG_at_10"] for i in range(4, 9)])
    assert table.loc["random-k8", name].startswith(
        f"{means.mean():.1f} ± {means.std(ddof=1):.1f} [{means.min():.1f}–{means.max():.1f}], n=5")
    assert table.loc["first stage (BM25)", name] == f"{100 * fs.mean():.1f}"
    row = tests[(tests.method == "CoRe-k8") & (tests.against == "random-k8 (mean of seeds)")].iloc[0]
    assert row["difference × 100"] == round(100 * float((core - random_mean).mean()), 1)
    assert float(row["p (Holm)"]) == pytest.approx(adjusted[("CoRe-k8", "random")], rel=1e-2)
    icr_row = tests[(tests.method == "ICR") & (tests.against == "random-k8 (mean of seeds)")].iloc[0]
    assert float(icr_row["p (Holm)"]) == pytest.approx(adjusted[("ICR", "random")], rel=1e-2)
    beaten = sum(by_run["r1"]["metrics"]["rerank.nDCG_at_10"] > m / 100 for m in means)
    assert row["random draws it beats"] == f"{beaten}/5"


def test_orders_position_control_stability_cost_and_missing_cells(store, monkeypatch):
    study = store.study(monkeypatch, ["a", "b"])
    orders = scaling.order_table(study)
    icr = orders[(orders.model == "a") & (orders.method == "ICR")].iloc[0]
    assert icr["reversed"] == f"{100 * store.rows[10]['metrics']['rerank.nDCG_at_10']:.1f}" and icr["shuffled"] == ""
    control = scaling.position_control(study).set_index("model")
    shuffled_random = pd.concat([store.per_query[f"r{i}"]["rerank.nDCG@10"] for i in range(12, 17)], axis=1).mean(axis=1)
    lead = 100 * float((store.per_query["r11"]["rerank.nDCG@10"] - shuffled_random).mean())
    assert control.loc["a", "lead shuffled"] == f"{lead:+.1f}" and control.loc["b", "lead shuffled"] == ""
    heads, jac = scaling.stability(study)
    core = jac[jac.metric == "CoRe-k8"].iloc[0]
    assert core["J(0,1)"] == round(6 / 10, 2)  # 6 shared heads of 8 and 8: |∩| / |∪| = 6 / 10
    assert set(heads[heads.metric == "CoRe-k8"]["fold"]) == {0, 1}
    spent = scaling.cost(study)
    retriever = spent[(spent.model == "a") & (spent.order == "retriever")].iloc[0]
    assert retriever["runs"] == 10 and retriever["CPU s, costliest run"] == 900
    assert retriever["CPU s, all runs"] == 900 + 9 * 10 and retriever["prompts read out here"] == len(QUERIES)
    gaps = scaling.missing(study)
    assert "a × CoRe-k8, retriever order, detection fold 2" in gaps
    assert "a × QRHead-k8, reversed order" in gaps and "a × random-k8, reversed order (0 of 5 seeds)" in gaps
    assert "a × ICR, shuffled order" in gaps
    assert not any(g.startswith("a × CoRe-k8, shuffled") or g.startswith("a × ICR, reversed") for g in gaps)
    assert sum(g.startswith("b × ") for g in gaps) == 5 + 8 + 4  # model b has no run at all
