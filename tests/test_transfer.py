"""The transfer report (corexp.studies.transfer): roles from logged settings, the cross-validated sets' Holm-corrected
tests, the gap to the oracle and the missing cells, recomputed by hand from the same per-query values."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ttest_rel
from test_scaling import FakeStore, fake_key

from corexp.report.tables import holm
from corexp.studies import scaling, transfer

CV = {"detection.instances": "judged", "detection.folds": "5"}
SETS = {"core": {}, "qrhead": {"heads.variant": "beir"}, "window": {}}


def test_a_runs_detection_source_comes_from_its_keys():
    assert transfer.role(fake_key("core", fold=0))["fold"] == transfer.SCIFACT
    assert transfer.role(fake_key("core", fold=None, params=CV))["fold"] == transfer.CV
    judged_elsewhere = {"detection.instances": "judged", "detection.folds": "None"}
    assert transfer.role(fake_key("core", fold=None, params=judged_elsewhere))["fold"] is None  # neither source here
    assert transfer.role(fake_key("all", params=CV))["fold"] is None  # ICR detects nothing


@pytest.fixture
def study(monkeypatch):
    fs = FakeStore()
    values = {"ICR": fs.add("a", "all")[1]}
    values["random"] = pd.concat([fs.add("a", "random", seed=s)[1] for s in range(5)], axis=1).mean(axis=1)
    for heads, extra in SETS.items():
        values[(heads, "sci")] = fs.add("a", heads, extra=extra, shift=0.02)[1]
        values[(heads, "cv")] = fs.add("a", heads, fold=None, extra={**extra, **CV}, shift=0.05)[1]
    fs.add("b", "all")  # a model without detected runs: its cells are listed as missing
    monkeypatch.setattr(scaling, "per_query_or_none",
                        lambda store, row, column, cache, unreadable: fs.per_query[row["run_id"]][column])
    df = pd.DataFrame(fs.rows)
    roles = pd.DataFrame([transfer.role(k) for k in df["key"]], index=df.index)
    return transfer.Transfer(scaling.Study(pd.concat([df, roles], axis=1), ["a", "b"]), {"a": 0.9}), values


def test_cross_validated_sets_are_tested_against_icr_random_and_their_scifact_twin_holm_corrected(study):
    t, values = study
    out = transfer.tables(t)
    names = {"core": "CoRe-k8", "qrhead": "QRHead-k8", "window": "window-w4"}
    raw = {}
    for heads, name in names.items():
        cv = values[(heads, "cv")]
        for against, ref in (("ICR", values["ICR"]), ("random-k8 (mean of seeds)", values["random"]),
                             (f"{name} · SciFact", values[(heads, "sci")])):
            raw[(name, against)] = (float(ttest_rel(cv.values, ref.values).pvalue), 100 * float((cv - ref).mean()))
    adjusted = holm({k: p for k, (p, _) in raw.items()})
    tests = out["tests"]
    assert len(tests) == 9 and set(tests["model"]) == {"a"}
    for _, row in tests.iterrows():
        key = (row["head set"].split(" · DL19 CV")[0], row["against"])
        assert row["p (Holm)"] == f"{adjusted[key]:.3g}"
        assert row["difference × 100"] == f"{round(raw[key][1], 1) + 0.0:+.1f}"
    table = out["table"]
    assert table.loc["CoRe-k8 · DL19 CV", "a"] == f"{100 * values[('core', 'cv')].mean():.1f}"
    assert table.loc["oracle top-8 (upper bound)", "a"] == "90.0"


def test_gap_to_the_oracle_and_missing_cells(study):
    t, values = study
    out = transfer.tables(t)
    gaps = out["gaps"].set_index("head set")
    sci, cv = values[("core", "sci")].mean(), values[("core", "cv")].mean()
    assert gaps.loc["CoRe-k8", "share closed by DL19 CV"] == f"{100 * (cv - sci) / (0.9 - sci):.0f} %"
    assert gaps.loc["CoRe-k8", "left to the oracle after DL19 CV"] == round(100 * (0.9 - cv), 1)
    missing = out["missing"]
    assert "b × CoRe-k8 detected on DL19 CV" in missing and "b × oracle top-8 (no atlas run)" in missing
    assert not any(m.startswith("a ×") for m in missing if "QRHead-lme" not in m)
    said = transfer.reading(t, out)
    assert said[0].startswith("- **a** (ICR") and said[-2].startswith("- **Does in-domain detection make the chosen heads pay?**")
    assert np.isfinite(float(gaps.loc["CoRe-k8", "oracle"]))
