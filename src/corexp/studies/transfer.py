"""Where the heads come from (docs/transfer.md): head sets detected on SciFact train (fold 0: the zero-shot transfer
both papers practise) against the same selectors detected in-domain on DL19 by 5-fold cross-validation
(`detection=crossval`: every query scored with heads chosen on the other folds), with ICR, random heads and the oracle
top-8 (the 8 best single heads on the evaluation queries themselves: an upper bound, not a method).

    python -m corexp.studies.transfer --out docs/transfer.md [--readme]

Runs: `scripts/scaling_study.py --phases main` (experiment `scaling`: ICR, random-k8, the SciFact-detected sets),
`scripts/transfer_study.py` (experiment `transfer`: the cross-validated sets), the head atlas (experiment `atlas`: the
oracle). A run's role comes from its logged settings; every number is read from the store (per-query tables for the
paired tests) and a cell without a run is listed as missing, never estimated.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from corexp.components.heads import jaccard, parse_head
from corexp.errors import cli_main
from corexp.locations import project_root
from corexp.report.tables import holm, load_runs
from corexp.studies.scaling import (
    MEASURE,
    MODEL_NAMES,
    Study,
    _cell,
    _lead,
    _md,
    _ttest,
    describe,
    model_sizes,
    study_arguments,
    update_readme,
    write_markdown,
)
from corexp.tracking.identity import RunKey
from corexp.tracking.tracker import Store

SCIFACT, CV = 0, -1  # the `fold` of a run's role: SciFact train fold 0, or in-domain cross-validation
SOURCES = {SCIFACT: "SciFact", CV: "DL19 CV"}
DETECTED = ("CoRe-k8", "QRHead-k8", "QRHead-lme-k8", "window-w4")
TESTED = ("CoRe-k8", "QRHead-k8", "window-w4")  # the three selectors: Holm over their tests per model
README_MARKERS = ("<!-- transfer-reading:start (generated: python -m corexp.studies.transfer --readme) -->",
                  "<!-- transfer-reading:end -->")


def role(key: RunKey) -> dict:
    """describe() plus the detection source: judged cross-validation runs get fold CV (-1)."""
    out = describe(key)
    detection = key.components().get("detection")
    if detection is not None and detection.judged:
        out["fold"] = CV if detection.folds else None
    return out


def transfer_frame(store: Store, experiments: list[str]) -> pd.DataFrame:
    df = load_runs(store, experiments)
    df = df[df["dataset"] == "dl19"].copy()
    roles = pd.DataFrame([role(k) for k in df["key"]], index=df.index)
    out = pd.concat([df, roles], axis=1)
    out.attrs.update(df.attrs)
    return out


def oracles(store: Store, experiment: str = "atlas", k: int = 8) -> dict[str, float]:
    """The oracle top-k nDCG@10 per model on DL19, from the newest atlas run (the current code's where there is one)."""
    from corexp.tracking.identity import code_digest

    current = code_digest()
    chosen = {}
    for r in sorted(store.finished_runs([experiment]), key=lambda r: (r.code_digest == current, r.start_ms)):
        if r.tags.get("study") == "atlas" and r.tags.get("dataset") == "dl19":
            chosen[r.tags["model"]] = r
    out = {}
    for model, r in chosen.items():
        sets = pd.read_csv(store.artifact(r.run_id, "sets.csv"))
        row = sets[sets["head set"].str.startswith(f"oracle top-{k}")]
        if len(row):
            out[model] = float(row.iloc[0][MEASURE])
    return out


def _shown(heads: list[tuple[int, int]], family: str) -> str:
    """A head list as text; a window as its layers."""
    if family.startswith("window") and heads:
        layers = sorted({layer for layer, _ in heads})
        return f"layers [{layers[0]}, {layers[-1] + 1})"
    return ",".join(f"{l}-{h}" for l, h in heads)


def _heads(row: pd.Series) -> list[list[tuple[int, int]]]:
    """The head sets of a run: one, or one per cross-validation fold (`a | b | c`)."""
    listed = row["params"].get("selected_heads", "")
    return [[parse_head(h) for h in part.split(",") if h.strip()] for part in listed.split(" | ") if part.strip()]


class Transfer:
    """The study's cells: per model, each selector's per-query values by detection source, ICR, random, the oracle."""

    def __init__(self, study: Study, oracle: dict[str, float]):
        self.study, self.oracle = study, oracle

    def means(self, model: str, family: str, source: int | None = None) -> list[float]:
        return self.study.means(model, family, fold=source)

    def values(self, model: str, family: str, source: int | None = None) -> pd.Series | None:
        return self.study.values(model, family, fold=source)

    def run(self, model: str, family: str, source: int) -> pd.Series | None:
        g = self.study.runs(model, family, fold=source)
        return g.iloc[-1] if len(g) else None


def tables(t: Transfer) -> dict[str, pd.DataFrame | list[str]]:
    """The main table, the Holm-corrected tests, the gap to the oracle, head overlap and the missing cells."""
    study = t.study
    rows, tests, gaps, overlap, missing = {}, [], [], [], []
    for model in study.models:
        name = MODEL_NAMES.get(model, model)
        fs = study.first_stage_mean(model)
        col = {"first stage (BM25)": f"{100 * fs:.1f}" if fs == fs else ""}
        for f in ("ICR", "random-k8"):
            col[f] = _cell(t.means(model, f), seeds=f == "random-k8")
            if not col[f]:
                missing.append(f"{name} × {f}")
        for f in DETECTED:
            for source, label in SOURCES.items():
                col[f"{f} · {label}"] = _cell(t.means(model, f, source))
                if not col[f"{f} · {label}"]:
                    missing.append(f"{name} × {f} detected on {label}")
        oracle = t.oracle.get(model)
        col["oracle top-8 (upper bound)"] = "" if oracle is None else f"{100 * oracle:.1f}"
        if oracle is None:
            missing.append(f"{name} × oracle top-8 (no atlas run)")
        rows[name] = col
        icr, rnd = t.values(model, "ICR"), t.values(model, "random-k8")
        raw = {}
        for f in TESTED:
            cv, sci = t.values(model, f, CV), t.values(model, f, SCIFACT)
            for against, ref in (("ICR", icr), ("random-k8 (mean of seeds)", rnd), (f"{f} · SciFact", sci)):
                p = _ttest(cv, ref)
                if p is not None:
                    raw[(f, against)] = (p, _lead(cv, ref))
        adjusted = holm({k: v[0] for k, v in raw.items()})
        tests += [{"model": name, "head set": f"{f} · DL19 CV", "against": against, "difference × 100": f"{round(lead, 1) + 0.0:+.1f}",
                   "p (Holm)": f"{adjusted[(f, against)]:.3g}"} for (f, against), (_, lead) in raw.items()]
        for f in DETECTED:
            sci, cv = t.means(model, f, SCIFACT), t.means(model, f, CV)
            if cv and oracle is not None:
                room = 100 * (oracle - sci[0]) if sci else float("nan")
                gaps.append({"model": name, "head set": f, "SciFact": round(100 * sci[0], 1) if sci else "",
                             "DL19 CV": round(100 * cv[0], 1), "oracle": round(100 * oracle, 1),
                             "gap to the oracle from SciFact": round(room, 1) if sci else "",
                             "share closed by DL19 CV": f"{100 * (cv[0] - sci[0]) / (oracle - sci[0]):.0f} %" if room > 0 else "",
                             "left to the oracle after DL19 CV": round(100 * (oracle - cv[0]), 1),
                             "_closed": (cv[0] - sci[0]) / (oracle - sci[0]) if room > 0 else None,
                             "_change": 100 * (cv[0] - sci[0]) if sci else None})
            r_sci, r_cv = t.run(model, f, SCIFACT), t.run(model, f, CV)
            if r_sci is not None and r_cv is not None:
                base, folds = _heads(r_sci), _heads(r_cv)
                j = [jaccard(base[0], fh) for fh in folds] if base else []
                pair = [jaccard(a, b) for i, a in enumerate(folds) for b in folds[i + 1:]]
                overlap.append({"model": name, "head set": f, "SciFact heads": _shown(base[0], f) if base else "",
                                "Jaccard SciFact vs each CV fold (mean [min–max])":
                                    f"{np.mean(j):.2f} [{min(j):.2f}–{max(j):.2f}]" if j else "",
                                "Jaccard between CV folds (mean)": f"{np.mean(pair):.2f}" if pair else ""})
    table = pd.DataFrame(rows)
    table.index.name = "head set · detected on"
    return {"table": table, "tests": pd.DataFrame(tests), "gaps": pd.DataFrame(gaps), "overlap": pd.DataFrame(overlap),
            "missing": missing}


def fold_heads(t: Transfer) -> pd.DataFrame:
    """Each cross-validated run's heads per fold."""
    rows = []
    for model in t.study.models:
        for f in DETECTED:
            r = t.run(model, f, CV)
            if r is not None:
                for i, hs in enumerate(_heads(r)):
                    rows.append({"model": MODEL_NAMES.get(model, model), "head set": f, "fold": i,
                                 "heads": _shown(hs, f)})
    return pd.DataFrame(rows)


def cost(t: Transfer) -> pd.DataFrame:
    """CPU seconds (all threads of the job's process): the run that read every DL19 prompt out (one forward per query,
    every head) and each cross-validated run (detection and re-ranking from the read-out tables)."""
    rows = []
    for model in t.study.models:
        g = t.study.df[(t.study.df["model"] == model) & (t.study.df["order"] == "retriever")]
        for _, r in g.iterrows():
            m = r["metrics"]
            read = int(max(0.0, float(m.get("queries", 0)) - float(m.get("readout_cache_hits", 0))))
            cv = r["fold"] == CV
            if read or cv:
                rows.append({"model": MODEL_NAMES.get(model, model),
                             "run": f"{r['family']}" + (" · DL19 CV" if cv else ""),
                             "prompts read out (forwards)": read, "CPU s": round(float(m.get("cpu_time_s", float("nan")))),
                             "wall s": round(float(m.get("wall_time_s", float("nan"))))})
    return pd.DataFrame(rows)


def _said(tests: pd.DataFrame, name: str, f: str, against: str) -> str:
    row = tests[(tests["model"] == name) & (tests["head set"] == f"{f} · DL19 CV") & (tests["against"] == against)] \
        if len(tests) else tests
    if not len(row):
        return f"vs {against}: no test"
    r = row.iloc[0]
    p = float(r["p (Holm)"])
    verdict = "beats" if p < 0.05 and float(r["difference × 100"]) > 0 else "loses to" if p < 0.05 else "does not differ from"
    return f"{verdict} {against} ({r['difference × 100']}, Holm p = {r['p (Holm)']})"


def reading(t: Transfer, out: dict) -> list[str]:
    """Per model: the cross-validated CoRe and QRHead sets against ICR and their SciFact-detected twins, and the share
    of the gap to the oracle they close."""
    table, tests, gaps = out["table"], out["tests"], out["gaps"]
    lines = []
    for model in t.study.models:
        name = MODEL_NAMES.get(model, model)
        if name not in table.columns:
            continue
        col = table[name]
        parts = []
        for f in TESTED:
            cv, sci = col.get(f"{f} · DL19 CV", ""), col.get(f"{f} · SciFact", "")
            if not cv:
                continue
            g = gaps[(gaps["model"] == name) & (gaps["head set"] == f)] if len(gaps) else gaps
            closed = ""
            if len(g) and g.iloc[0]["_closed"] is not None and g.iloc[0]["_closed"] == g.iloc[0]["_closed"]:
                share = g.iloc[0]["_closed"]
                closed = f", closing {100 * share:.0f} % of the gap to the oracle" if share >= 0 else \
                    f", widening the gap to the oracle ({g.iloc[0]['_change']:+.1f})"
            parts.append(f"{f} {sci or '—'} → {cv} in-domain: {_said(tests, name, f, 'ICR')}; "
                         f"{_said(tests, name, f, f'{f} · SciFact')}{closed}")
        if parts:
            lines.append(f"- **{name}** (ICR {col['ICR']}, random-k8 {col['random-k8'].split(' [')[0]}, oracle top-8 "
                         f"{col['oracle top-8 (upper bound)'] or 'not computed'}): " + "; ".join(parts) + ".")
    return lines + answers(t, tests, gaps)


def answers(t: Transfer, tests: pd.DataFrame, gaps: pd.DataFrame) -> list[str]:
    """The study's two questions, answered from the tables: where in-domain heads beat ICR (Holm p < 0.05), and how
    much of the gap to the oracle they close (from the SciFact-detected set) or leave."""
    if not len(tests):
        return []
    wins, none = [], []
    for model in t.study.models:
        name = MODEL_NAMES.get(model, model)
        rows = tests[(tests["model"] == name) & (tests["against"] == "ICR")]
        won = [f"{r['head set'].split(' · ')[0]} {r['difference × 100']} (p = {r['p (Holm)']})" for _, r in rows.iterrows()
               if float(r["p (Holm)"]) < 0.05 and float(r["difference × 100"]) > 0]
        (wins if won else none).append(f"{name}: {', '.join(won)}" if won else name)
    out = [f"- **Does in-domain detection make the chosen heads pay?** Cross-validated heads beat ICR at "
           f"{'; '.join(wins) or 'no model size'}; no cross-validated set beats ICR at {', '.join(none) or 'no model size'}."]
    if len(gaps):
        parts = []
        for model in t.study.models:
            name = MODEL_NAMES.get(model, model)
            g = gaps[(gaps["model"] == name) & gaps["head set"].isin(["CoRe-k8", "QRHead-k8"])]
            said = [f"{r['head set']} " + (f"closes {r['share closed by DL19 CV']} of it" if r["share closed by DL19 CV"]
                                          and r["_closed"] >= 0 else "closes none of it" if r["share closed by DL19 CV"]
                                          else "SciFact cell missing") + f", {r['left to the oracle after DL19 CV']} left"
                    for _, r in g.iterrows()]
            if said:
                parts.append(f"{name}: {'; '.join(said)}")
        out.append("- **How much of the gap to the oracle does it close?** (gap = oracle top-8 − the SciFact-detected set; "
                   "left = oracle − the cross-validated set, × 100) " + " · ".join(parts) + ".")
    return out


def figure(t: Transfer, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = t.study
    models, x = model_sizes(study)
    fig, axes = plt.subplots(1, len(TESTED), figsize=(13, 4), sharey=True)
    for ax, f in zip(axes, TESTED):
        fs = [study.first_stage_mean(m) for m in models]
        if fs:
            ax.axhline(100 * fs[0], color="black", ls="--", lw=1, label="BM25 (first stage)")
        ora = [(s, 100 * t.oracle[m]) for m, s in zip(models, x) if m in t.oracle]
        if ora:
            ax.plot(*zip(*ora), "-", color="gold", lw=9, alpha=0.35, label="oracle top-8 (upper bound)")
        band = [(s, 100 * np.array(t.means(m, "random-k8"))) for m, s in zip(models, x) if t.means(m, "random-k8")]
        if band:
            xs = [s for s, _ in band]
            ax.fill_between(xs, [v.min() for _, v in band], [v.max() for _, v in band], color="gray", alpha=0.2,
                            label="random-k8 (min–max of 5)")
        for label, family, source, style in (("ICR", "ICR", None, "s-"), (f"{f} · SciFact", f, SCIFACT, "o--"),
                                             (f"{f} · DL19 CV", f, CV, "o-")):
            pts = [(s, 100 * t.means(m, family, source)[0]) for m, s in zip(models, x) if t.means(m, family, source)]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x, [MODEL_NAMES.get(m, m).replace("-", "\n", 1) for m in models], fontsize=7)
        ax.set_xlabel("model size (parameters, log scale)")
        ax.set_title(f"{f}: detected on SciFact vs in-domain (DL19, 5-fold CV)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel(f"{MEASURE} × 100 (DL19, BM25 top-20)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def write(uri: str, experiments: list[str], atlas: str, out: Path, models: list[str], readme: Path | None = None) -> str:
    store = Store(uri)
    df = transfer_frame(store, experiments)
    study = Study(df, [m for m in models if m in set(df["model"])] or models, store)
    t = Transfer(study, oracles(store, atlas))
    res = tables(t)
    missing = res["missing"] + [f"{MODEL_NAMES.get(m, m)} × every head set (no run in the store)" for m in models
                                if m not in study.models]
    said = reading(t, res)
    if readme is not None:
        update_readme(said, readme, README_MARKERS)
    fig = figure(t, out.with_name(out.stem + "_figure.png"))
    queries = sorted({int(q) for q in df["queries"] if q == q})
    md = ["# Where the heads come from: SciFact-detected vs in-domain (cross-validated) heads\n",
          f"TREC DL19 ({', '.join(map(str, queries))} queries), the BM25 top-20 of the shipped run, documents in retriever "
          f"order, {MEASURE} × 100, fp32. **· SciFact**: heads chosen on 40 SciFact train queries (`detection=scifact_train`, "
          "fold 0: (query, positive, 19 hard negatives) instances, documents cut to 60 words) and applied zero-shot, as "
          "both papers detect on one domain. **· DL19 CV**: heads chosen in-domain by 5-fold cross-validation "
          "(`detection=crossval`): the 43 queries are dealt into 5 seeded folds and each fold is re-ranked with heads "
          "detected on the other folds' re-ranking prompts — each judged-relevant candidate against the non-relevant "
          "and unjudged ones (CoRe, QRHead-lme, the window), each head's nDCG@10 with the graded judgments (QRHead's BEIR "
          "driver) — read from the same read-out tables that re-rank. No query is scored with heads detected on it. "
          "**The oracle top-8 is an upper bound, not a method**: the 8 best single heads on the evaluation queries "
          "themselves (docs/atlas.md). random-k8: five seeds, mean ± sd [min–max]. Paired t-tests over queries of each "
          "cross-validated set against ICR, the per-query mean of the random draws and its SciFact-detected twin, "
          "Holm-corrected per model over the nine tests of CoRe-k8, QRHead-k8 and window-w4 (QRHead-lme-k8 is shown, "
          "not tested). Generated by `python -m corexp.studies.transfer` from the runs of `scripts/scaling_study.py "
          "--phases main`, `scripts/transfer_study.py` and the head atlas.\n",
          f"![nDCG@10 against model size per detection source]({fig.name})\n",
          "## Reading (generated from the tables below)\n", *said, "",
          "## nDCG@10 per head set and detection source\n", _md(res["table"], True), "",
          "## Paired tests of the cross-validated sets\n", _md(res["tests"]), "",
          "## How much of the gap to the oracle in-domain detection closes\n",
          _md(res["gaps"].drop(columns=["_closed", "_change"], errors="ignore")), "",
          "## Head overlap: SciFact-detected set vs the cross-validated folds' sets\n", _md(res["overlap"]), "",
          "## The cross-validated heads, per fold\n", _md(fold_heads(t)), "",
          "## Cost (CPU seconds of each job's process)\n", _md(cost(t)), "",
          "## Missing (not computed: listed, never estimated)\n", *([f"- {m}" for m in missing] or ["- none"]), ""]
    return write_markdown(out, md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.studies.transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default="scaling,transfer", help="experiments holding the study's runs")
    ap.add_argument("--atlas-experiment", default="atlas")
    study_arguments(ap, "transfer.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    readme = project_root() / "README.md" if args.readme else None
    return cli_main("corexp.transfer", lambda: print(write(args.tracking_uri, args.experiments.split(","),
                                                           args.atlas_experiment, Path(args.out), args.models.split(","),
                                                           readme)))


if __name__ == "__main__":
    sys.exit(main())
