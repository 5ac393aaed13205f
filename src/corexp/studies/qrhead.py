"""QRHead detection as the official code computes it, on DL19 (docs/qrhead.md): the corrected QRHead heads (both official
drivers) against the metric corexp called QRHead before (QR-R: uncalibrated mass on the positive), CoRe, ICR and random
heads, from the runs of `scripts/scaling_study.py --phases main` (experiment `scaling`).

    python -m corexp.studies.qrhead --experiment scaling --out docs/qrhead.md

Every number is read from the store (per-query tables for the paired tests); a model without a cell is listed as
missing, never estimated.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from corexp.components.heads import jaccard, parse_head
from corexp.errors import cli_main
from corexp.locations import project_root
from corexp.report.tables import holm
from corexp.studies.scaling import (
    MEASURE,
    MODEL_NAMES,
    Study,
    _cell,
    _lead,
    _md,
    _ttest,
    study_arguments,
    study_frame,
    update_readme,
    write_markdown,
)
from corexp.tracking.tracker import Store

SETS = ("ICR", "QRHead-k8", "QRHead-lme-k8", "QR-R-k8", "CoRe-k8", "random-k8")
DETECTED = ("QRHead-k8", "QRHead-lme-k8", "QR-R-k8", "CoRe-k8")
TESTS = [("QRHead-k8", "ICR"), ("QRHead-k8", "random-k8"), ("QRHead-k8", "QR-R-k8"), ("QRHead-lme-k8", "ICR"),
         ("QRHead-lme-k8", "random-k8"), ("QRHead-lme-k8", "QR-R-k8"), ("CoRe-k8", "QRHead-k8"), ("QR-R-k8", "random-k8")]


def tables(study: Study) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """nDCG@10 per model and head set; the Holm-corrected paired tests (per model); the chosen heads; missing cells."""
    rows, tests, heads, missing = {}, [], [], []
    for model in study.models:
        name = MODEL_NAMES.get(model, model)
        fs = study.first_stage_mean(model)
        col = {"first stage (BM25)": f"{100 * fs:.1f}" if fs == fs else ""}
        for f in SETS:
            means = study.means(model, f)
            col[f] = _cell(means, seeds=f == "random-k8")
            if not means:
                missing.append(f"{name} × {f}")
        rows[name] = col
        vals = {f: study.values(model, f) for f in SETS}
        raw = {(a, b): _ttest(vals[a], vals[b]) for a, b in TESTS}
        adjusted = holm({k: v for k, v in raw.items() if v is not None})
        for a, b in TESTS:
            if vals[a] is None or vals[b] is None:
                continue
            p = adjusted.get((a, b))
            tests.append({"model": name, "head set": a, "against": b + (" (mean of seeds)" if b == "random-k8" else ""),
                          "difference × 100": round(_lead(vals[a], vals[b]), 1),
                          "p (Holm)": "" if p is None else f"{p:.3g}"})
        core = None
        for f in DETECTED:
            g = study.runs(model, f)
            if not len(g):
                continue
            listed = g.iloc[-1]["params"].get("selected_heads", "")
            hs = [parse_head(h) for h in listed.split(",") if h]
            core = hs if f == "CoRe-k8" else core
            heads.append({"model": name, "head set": f, "heads (layer-head, best first)": listed,
                          "in layer 0": sum(layer == 0 for layer, _ in hs), "_heads": hs})
        for row in heads:
            if row["model"] == name:
                row["Jaccard with CoRe-k8"] = "" if core is None else round(jaccard(row["_heads"], core), 2)
    table = pd.DataFrame(rows)
    table.index.name = "head set"
    head_table = pd.DataFrame(heads).drop(columns=["_heads"]) if heads else pd.DataFrame()
    return table, pd.DataFrame(tests), head_table, missing


def _said(t: pd.DataFrame, a: str, b: str) -> str:
    """One test of the model's table `t` as a clause: beats / loses to / does not differ from, with its lead and p."""
    row = t[(t["head set"] == a) & (t["against"].str.startswith(b))] if len(t) else t
    if not len(row):
        return f"{a} vs {b}: no test"
    r = row.iloc[0]
    p = float(r["p (Holm)"]) if r["p (Holm)"] else float("nan")
    verdict = "beats" if p < 0.05 and r["difference × 100"] > 0 else "loses to" if p < 0.05 else "does not differ from"
    return f"{a} {verdict} {b} ({r['difference × 100']:+.1f}, Holm p = {r['p (Holm)'] or 'n/a'})"


def reading(study: Study, table: pd.DataFrame, tests: pd.DataFrame) -> list[str]:
    """One sentence per model from the tables: the old and the new QRHead number and what the tests say."""
    out = []
    for model in study.models:
        name = MODEL_NAMES.get(model, model)
        if name not in table.columns or not table.loc["QRHead-k8", name]:
            continue
        t = tests[tests.model == name] if len(tests) else tests

        def said(a: str, b: str, t: pd.DataFrame = t) -> str:
            return _said(t, a, b)

        col = table[name]
        out.append(f"- **{name}**: QR-R-k8 (corexp's old \"QRHead-k8\") {col['QR-R-k8']} → QRHead-k8 {col['QRHead-k8']} "
                   f"(long-context variant {col['QRHead-lme-k8']}); ICR {col['ICR']}, CoRe-k8 {col['CoRe-k8']}, random-k8 "
                   f"{col['random-k8'].split(' [')[0]}. {said('QRHead-k8', 'ICR')}; {said('QRHead-k8', 'random-k8')}; "
                   f"{said('QRHead-k8', 'QR-R-k8')}; {said('CoRe-k8', 'QRHead-k8')}.")
    return out


README_MARKERS = ("<!-- qrhead-reading:start (generated: python -m corexp.studies.qrhead --readme) -->",
                  "<!-- qrhead-reading:end -->")


def write(uri: str, experiment: str, out: Path, models: list[str], readme: Path | None = None) -> str:
    store = Store(uri)
    df = study_frame(store, experiment)
    study = Study(df, [m for m in models if m in set(df["model"])] or models, store)
    table, tests, heads, missing = tables(study)
    missing += [f"{MODEL_NAMES.get(m, m)} × every head set (no run in the store)" for m in models if m not in study.models]
    queries = sorted({int(q) for q in df["queries"] if q == q})
    said = reading(study, table, tests)
    if readme is not None:
        update_readme(said, readme, README_MARKERS)
    md = [f"# QRHead detection as the official code computes it ({experiment})\n",
          f"TREC DL19 ({', '.join(map(str, queries))} queries), the BM25 top-20 of the shipped run, documents in retriever "
          f"order, {MEASURE} × 100, fp32. Heads chosen on 40 queries of the SciFact train split (`detection=scifact_train`, "
          "fold 0; disjoint from DL19). **QRHead-k8** (`heads=qrhead`, `heads.variant=beir`): QRHead's BEIR detection "
          "driver — every head's N/A-calibrated, per-head masked document scores, documents shuffled (seed 42), a head "
          "scored by the nDCG@10 of its own rankings. **QRHead-lme-k8** (`heads.variant=lme`): its long-context driver "
          "(the paper's QRScore: mean calibrated score of the positive). **QR-R-k8** (`heads=qr_r`): the uncalibrated "
          "mass on the positive (CoRe's QR-R baseline) — what corexp's `heads=qrhead` computed before 2026-12, so every "
          "\"QRHead\" cell of docs/scaling.md, docs/atlas.md and docs/results.md older than this document is a QR-R cell. "
          "random-k8: five seeds, mean ± sd [min–max]. Paired t-tests over queries, Holm-corrected per model over the "
          "tests listed. Generated by `python -m corexp.studies.qrhead` from the runs of `scripts/scaling_study.py "
          "--phases main`.\n",
          "## Reading (generated from the tables below)\n", *said, "",
          "## nDCG@10 per head set\n", _md(table, True), "",
          "## Paired tests\n", _md(tests), "",
          "## The chosen heads\n", _md(heads), "",
          "## Missing (not computed: listed, never estimated)\n",
          *([f"- {m}" for m in missing] or ["- none"]), ""]
    return write_markdown(out, md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.studies.qrhead", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="scaling")
    study_arguments(ap, "qrhead.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    readme = project_root() / "README.md" if args.readme else None
    return cli_main("corexp.qrhead", lambda: print(write(args.tracking_uri, args.experiment, Path(args.out),
                                                         args.models.split(","), readme)))


if __name__ == "__main__":
    sys.exit(main())
