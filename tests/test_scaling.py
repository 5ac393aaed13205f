"""The scaling report (corexp.studies.scaling): every cell, test and Jaccard it prints is recomputed here by hand from the
same per-query values; a run's role comes from its logged settings; cells without runs are listed as missing."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ttest_rel

from corexp.report.tables import holm
from corexp.studies import scaling

from helpers import build_job

QUERIES = [f"q{i}" for i in range(12)]
COL = "rerank.nDCG_at_10"
HEADS = {"all": "ICR()", "core": "CoRe(k={k},tau=0.1)", "qrhead": "QRHead(k={k}{variant})", "qr_r": "QRR(k={k})",
         "random": "Random(k={k},seed={seed})", "window": "Window(width=4)"}
ORDERS = {"retriever": "Prompt()", "reversed": "Prompt(doc_order=ReversedOrder())",
          "shuffled": "Prompt(doc_order=ShuffledOrder())"}


def fake_key(heads, k=8, order="retriever", fold=0, seed=None, fusion="none", calibrated=True, params=None):
    """The run key a job of these settings logs, written as keys (what the report reads back from key.* params)."""
    from corexp.tracking.identity import RunKey

    params = params or {}
    variant = f",variant='{params['heads.variant']}'" if "heads.variant" in params else ""
    keys = [("model", "Model(name='m')"), ("data", "Data(name='dl19')"), ("prompt", ORDERS[order]),
            ("heads", HEADS[heads].format(k=k, seed=seed or 0, variant=variant)), ("first_stage", "Auto()"),
            ("truncation", "AutoTruncation()"), ("fusion", "RRF()" if fusion == "rrf" else "NoFusion()"),
            ("scoring", "Scoring()" if calibrated else "Scoring(calibration=False)")]
    if heads in ("core", "qrhead", "qr_r", "window"):  # selectors that detect carry their detection set
        folds = params.get("detection.folds")
        keys.append(("detection", f"Detection(name='dl19',instances='judged',folds={folds})"
                     if params.get("detection.instances") == "judged" else f"Detection(name='scifact-train',fold={fold})"))
    return RunKey(tuple(keys), 0)


class FakeStore:
    """Runs as the report loads them (one row per config) and their per-query tables by run id."""

    def __init__(self):
        self.rows, self.per_query, self.rng = [], {}, np.random.default_rng(7)
        self.first_stage = pd.Series(self.rng.uniform(0.3, 0.7, len(QUERIES)), index=QUERIES)

    def add(self, model, heads, k=8, order="retriever", fold=0, seed=None, fusion="none", calibrated=True, extra=None,
            cpu=10.0, shift=0.0, metrics=None):
        run_id = f"r{len(self.rows)}"
        values = (self.first_stage + shift + self.rng.normal(0, 0.05, len(QUERIES))).clip(0, 1)
        self.per_query[run_id] = pd.DataFrame({COL: values, "first_stage.nDCG_at_10": self.first_stage,
                                               "length_bias.gal": [float(i % 2) for i in range(len(QUERIES))],
                                               "length_bias.ratio": [0.4 + 0.1 * i for i in range(len(QUERIES))]},
                                              index=QUERIES)
        params = {"heads.name": heads, "heads.k": str(k), "fusion.name": fusion, "prompt.doc_order.name": order,
                  "detection.fold": str(fold), "scoring.calibration": str(calibrated), **(extra or {})}
        if heads == "window":
            params["heads.width"] = "4"
        if seed is not None:
            params["heads.seed"] = str(seed)
        self.rows.append({"run_id": run_id, "run_name": f"{model} · {heads} {run_id}", "model": model, "dataset": "dl19",
                          "params": params, "key": fake_key(heads, k, order, fold, seed, fusion, calibrated, params),
                          "metrics": {COL: float(values.mean()), "first_stage.nDCG_at_10": float(self.first_stage.mean()),
                                      "cpu_time_s": cpu, "queries": float(len(QUERIES)),
                                      "readout_cache_hits": 0.0 if cpu > 100 else 12.0,
                                      "model_parameters": {"a": 1.35e8, "b": 1.5e9}[model], **(metrics or {})},
                          "queries": float(len(QUERIES))})
        return run_id, values

    def study(self, monkeypatch, models):
        monkeypatch.setattr(scaling, "per_query_or_none",
                            lambda store, row, column, cache, unreadable: self.per_query[row["run_id"]][column])
        df = pd.DataFrame(self.rows)
        roles = pd.DataFrame([scaling.describe(k) for k in df["key"]], index=df.index)
        return scaling.Study(pd.concat([df, roles], axis=1), models)


CORE = ["18-6", "22-7", "23-2", "17-3", "21-8", "14-3", "20-3", "23-7"]


@pytest.fixture
def store():
    s = FakeStore()
    s.add("a", "all", cpu=900.0, shift=-0.1)  # r0
    s.add("a", "core", extra={"selected_heads": ",".join(CORE)}, shift=0.05)  # r1
    s.add("a", "core", fold=1, extra={"selected_heads": ",".join([*CORE[:6], "1-1", "2-2"])})  # r2
    s.add("a", "qr_r", extra={"selected_heads": "0-0,0-1"})  # r3
    for seed in range(5):  # r4-r8
        s.add("a", "random", seed=seed, shift=-0.05)
    s.add("a", "core", fusion="rrf")  # r9
    s.add("a", "all", order="reversed", cpu=800.0, shift=0.02)  # r10
    s.add("a", "core", order="shuffled")  # r11
    for seed in range(5):  # r12-r16
        s.add("a", "random", order="shuffled", seed=seed)
    s.add("a", "window", extra={"selected_window": "9-13"}, metrics={"kept_layers": 13.0}, shift=0.03)  # r17
    s.add("a", "all", calibrated=False, metrics={"length_bias.gal": 0.25, "length_bias.queries": 12.0,
                                                  "length_bias.queries_biased": 4.0, "length_bias.gal_biased": 0.0})  # r18
    return s


def test_a_runs_role_comes_from_its_keys():
    d = scaling.describe(fake_key("core", fusion="rrf", order="shuffled", fold=2, calibrated=False))
    assert d == {"family": "CoRe-k8 + RRF", "order": "shuffled", "fold": 2, "seed": None, "calibrated": False}
    assert scaling.describe(fake_key("random", seed=3))["seed"] == 3
    assert scaling.describe(fake_key("window"))["family"] == "window-w4"
    assert scaling.describe(fake_key("all", fold=1))["fold"] is None  # ICR detects nothing
    job = build_job(["heads=core", "fusion=rrf", "prompt.doc_order=reversed", "detection=scifact_train",
                     "detection.fold=1"])  # a real job's key: the same role
    assert scaling.describe(job.run_key()) == {"family": "CoRe-k8 + RRF", "order": "reversed", "fold": 1, "seed": None,
                                               "calibrated": True}


def test_main_table_cells_and_tests_match_a_hand_computation(store, monkeypatch):
    study = store.study(monkeypatch, ["a"])
    table, tests = scaling.main_table(study)
    name = scaling.MODEL_NAMES.get("a", "a")
    by_run = {r["run_id"]: r for r in store.rows}
    pq = lambda run: store.per_query[run][COL]  # noqa: E731
    icr, core, window = pq("r0"), pq("r1"), pq("r17")
    random_mean = pd.concat([pq(f"r{i}") for i in range(4, 9)], axis=1).mean(axis=1)
    fs = store.first_stage
    methods = {"ICR": icr, "QRHead-k8": pq("r3"), "CoRe-k8": core, "random-k8": random_mean, "window-w4": window,
               "CoRe-k8 + RRF": pq("r9")}
    raw = {(m, "first stage"): ttest_rel(v, fs).pvalue for m, v in methods.items()}
    for m in ("QRHead-k8", "CoRe-k8", "window-w4"):
        raw[(m, "ICR")] = ttest_rel(methods[m], icr).pvalue
        raw[(m, "random")] = ttest_rel(methods[m], random_mean).pvalue
    raw[("ICR", "random")] = ttest_rel(icr, random_mean).pvalue
    adjusted = holm(raw)
    core_cell = f"{100 * by_run['r1']['metrics'][COL]:.1f}"
    assert table.loc["CoRe-k8", name].startswith(core_cell)
    assert table.loc["CoRe-k8", name].endswith("†" if adjusted[("CoRe-k8", "first stage")] < 0.05 else core_cell[-1])
    means = 100 * np.array([by_run[f"r{i}"]["metrics"][COL] for i in range(4, 9)])
    assert table.loc["random-k8", name].startswith(
        f"{means.mean():.1f} ± {means.std(ddof=1):.1f} [{means.min():.1f}–{means.max():.1f}], n=5")
    assert table.loc["first stage (BM25)", name] == f"{100 * fs.mean():.1f}"
    assert table.loc["window-w4", name].startswith(f"{100 * by_run['r17']['metrics'][COL]:.1f}")
    row = tests[(tests.method == "CoRe-k8") & (tests.against == "random-k8 (mean of seeds)")].iloc[0]
    assert row["difference × 100"] == round(100 * float((core - random_mean).mean()), 1)
    assert float(row["p (Holm)"]) == pytest.approx(adjusted[("CoRe-k8", "random")], rel=1e-2)
    w = tests[(tests.method == "window-w4") & (tests.against == "ICR")].iloc[0]
    assert float(w["p (Holm)"]) == pytest.approx(adjusted[("window-w4", "ICR")], rel=1e-2)
    icr_row = tests[(tests.method == "ICR") & (tests.against == "random-k8 (mean of seeds)")].iloc[0]
    assert float(icr_row["p (Holm)"]) == pytest.approx(adjusted[("ICR", "random")], rel=1e-2)
    beaten = sum(by_run["r1"]["metrics"][COL] > m / 100 for m in means)
    assert row["random draws it beats"] == f"{beaten}/5"
    # the generated reading states the same comparisons
    (line,) = scaling.reading(study)
    diff = 100 * float((core - icr).mean())
    assert f"CoRe-k8 {'beats' if diff > 0 else 'trails'}" in line or "does not differ significantly from ICR" in line
    assert f"({diff:+.1f}, Holm p = {adjusted[('CoRe-k8', 'ICR')]:.2g})" in line


def test_windows_and_length_bias_tables(store, monkeypatch):
    study = store.study(monkeypatch, ["a"])
    w = scaling.windows_table(study).iloc[0]
    lead = 100 * float((store.per_query["r17"][COL] - store.per_query["r0"][COL]).mean())
    assert w["layers [start, end)"] == "9-13" and w["lead over ICR"] == f"{lead:+.1f}" and w["layers run"] == 13
    lb = scaling.length_bias_table(study)
    off = lb[(lb.method == "ICR") & (lb["N/A calibration"] == "off")].iloc[0]
    assert off["GAL, all (n)"] == "0.25 (12)" and off["GAL, length-biased (n)"] == "0.00 (4)"
    # gold shorter: ratio < 1 for the first 6 queries (0.4 ... 0.9), GAL alternating 0, 1: mean 0.5 over 6
    assert off["GAL, gold shorter (n)"] == "0.50 (6)"
    on = lb[(lb.method == "ICR") & (lb["N/A calibration"] == "on")].iloc[0]
    assert on["GAL, all (n)"] == ""  # that run logged no length-bias metric: shown empty, never estimated


def test_orders_position_control_stability_cost_and_missing_cells(store, monkeypatch):
    study = store.study(monkeypatch, ["a", "b"])
    orders = scaling.order_table(study)
    icr = orders[(orders.model == "a") & (orders.method == "ICR")].iloc[0]
    assert icr["reversed"] == f"{100 * store.rows[10]['metrics'][COL]:.1f}" and icr["shuffled"] == ""
    control = scaling.position_control(study).set_index("model")
    shuffled_random = pd.concat([store.per_query[f"r{i}"][COL] for i in range(12, 17)], axis=1).mean(axis=1)
    lead = 100 * float((store.per_query["r11"][COL] - shuffled_random).mean())
    assert control.loc["a", "lead shuffled"] == f"{lead:+.1f}" and control.loc["b", "lead shuffled"] == ""
    # the reading's sentence on the other orders: ICR reversed, CoRe-k8 shuffled and its lead over the draws there
    said = scaling._order_reading(study, "a")
    assert f"reversed: ICR {100 * store.rows[10]['metrics'][COL]:.1f}" in said
    assert f"shuffled: CoRe-k8 {100 * store.rows[11]['metrics'][COL]:.1f}, CoRe-k8 vs random {lead:+.1f} (p = " in said
    assert scaling._order_reading(study, "b") == ""
    heads, jac = scaling.stability(study)
    core = jac[jac.metric == "CoRe-k8"].iloc[0]
    assert core["J(0,1)"] == round(6 / 10, 2)  # 6 shared heads of 8 and 8: |∩| / |∪| = 6 / 10
    assert set(heads[heads.metric == "CoRe-k8"]["fold"]) == {0, 1}
    spent = scaling.cost(study)
    retriever = spent[(spent.model == "a") & (spent.order == "retriever")].iloc[0]
    assert retriever["runs"] == 12 and retriever["CPU s, costliest run"] == 900 and retriever["costliest method"] == "ICR"
    assert retriever["CPU s, all runs"] == 900 + 11 * 10 and retriever["prompts read out here"] == len(QUERIES)
    gaps = scaling.missing(study)
    assert "a × CoRe-k8, retriever order, detection fold 2" in gaps
    assert "a × QRHead-k8, reversed order" in gaps and "a × random-k8, reversed order (0 of 5 seeds)" in gaps
    assert "a × ICR, shuffled order" in gaps and "a × CoRe-k8, retriever order, no N/A calibration" in gaps
    assert "a × ICR, retriever order, no N/A calibration" not in gaps
    assert not any(g.startswith("a × CoRe-k8, shuffled") or g.startswith("a × ICR, reversed") for g in gaps)
    assert sum(g.startswith("b × ") for g in gaps) == len(scaling.METHODS) + 3 + 8 + 4  # model b has no run at all


def test_qr_r_and_qrhead_variants_are_told_apart_and_the_qrhead_report_recomputes_its_tests(store, monkeypatch):
    """QR-R and the two official QRHead variants are QR-R-k8, QRHead-k8 and QRHead-lme-k8 (a heads=qrhead run of corexp
    before the QRHead fix computed QR-R: corexp.migrate leaves it unkeyed, tests/test_report.py). docs/qrhead.md's cells
    and Holm tests by hand."""
    from corexp.studies import qrhead

    assert scaling.describe(fake_key("qrhead", params={"heads.variant": "beir"}))["family"] == "QRHead-k8"
    assert scaling.describe(fake_key("qrhead", params={"heads.variant": "lme"}))["family"] == "QRHead-lme-k8"
    assert scaling.describe(fake_key("qr_r"))["family"] == "QR-R-k8"
    _, new = store.add("a", "qrhead", extra={"heads.variant": "beir", "selected_heads": "17-3,23-2,0-1"}, shift=0.04)
    store.add("a", "qrhead", extra={"heads.variant": "lme", "selected_heads": "21-8,23-2"})
    study = store.study(monkeypatch, ["a", "b"])
    table, tests, heads, missing = qrhead.tables(study)
    assert table.loc["QRHead-k8", "a"] == f"{100 * new.mean():.1f}"
    assert table.loc["QR-R-k8", "a"] == f"{100 * store.rows[3]['metrics'][COL]:.1f}"  # r3: heads=qrhead, no variant
    icr = store.per_query["r0"][COL]
    raw = {(x, y): ttest_rel(store.per_query[rx][COL], store.per_query[ry][COL]).pvalue
           for (x, rx), (y, ry) in [(("QRHead-k8", "r19"), ("ICR", "r0")), (("QRHead-k8", "r19"), ("QR-R-k8", "r3"))]}
    got = tests[(tests.model == "a") & (tests["head set"] == "QRHead-k8") & (tests.against == "ICR")].iloc[0]
    assert got["difference × 100"] == round(100 * float((new - icr).mean()), 1)
    assert float(got["p (Holm)"]) >= raw[("QRHead-k8", "ICR")] - 1e-12  # Holm never lowers a p-value
    rows = heads.set_index("head set")
    assert rows.loc["QRHead-k8", "in layer 0"] == 1 and rows.loc["QR-R-k8", "in layer 0"] == 2
    assert rows.loc["QRHead-k8", "Jaccard with CoRe-k8"] == round(2 / 9, 2)  # {17-3, 23-2} of 9 distinct heads
    assert "b × QRHead-k8" in missing and "a × QRHead-k8" not in missing
