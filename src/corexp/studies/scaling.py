"""The scaling study's report (docs/scaling.md), built from the runs of one MLflow experiment (scripts/scaling_study.py):

    python -m corexp.studies.scaling --experiment scaling --out docs/scaling.md [--models smollm2,gemma3,qwen25coder,qwen25coder15]

Per model size: nDCG@10 of ICR, QRHead-k8, CoRe-k8, random-k8 heads (a distribution over seeds: mean, spread, and the
tests against the per-query mean of the draws), the layer window chosen on the detection set (window-w4) and CoRe-k8 +
RRF with the first stage, in the retriever order (the CoRe protocol), the reversed order (top-1 last, ICR's and
QRHead's) and a shuffled order (the same permutation per query for every method: the position-bias control); the head
sets detected on disjoint detection folds (Jaccard, and each set's nDCG@10); the length-bias test with and without the
N/A calibration; a figure of nDCG@10 against model size; and a generated reading of the key comparisons. A run's role
comes from its logged settings (heads, fusion, document order, fold, seed, calibration), never from its rendered name.
Every number comes from a run; a cell without one is listed as missing, never estimated.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from corexp.errors import cli_main
from corexp.locations import project_root
from corexp.report.tables import holm, load_runs, per_query_or_none
from corexp.tracking import names
from corexp.tracking.identity import RunKey
from corexp.tracking.tracker import Store

MEASURE = "nDCG@10"
COLUMN = "nDCG_at_10"
ORDERS = ("retriever", "reversed", "shuffled")
METHODS = ("ICR", "QRHead-k8", "QRHead-lme-k8", "QR-R-k8", "CoRe-k8", "random-k8", "window-w4", "CoRe-k8 + RRF")
CHOSEN = ("QRHead-k8", "QRHead-lme-k8", "QR-R-k8", "CoRe-k8", "window-w4")  # head sets chosen on the detection set
DEFAULT_MODELS = ("smollm2", "gemma3", "qwen25coder", "qwen25coder15")
MODEL_NAMES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M", "qwen25coder": "Qwen2.5-Coder-0.5B",
               "qwen25coder15": "Qwen2.5-Coder-1.5B"}
README_MARKERS = ("<!-- scaling-reading:start (generated: python -m corexp.studies.scaling --readme) -->",
                  "<!-- scaling-reading:end -->")


def describe(key: RunKey) -> dict:
    """A run's place in the study, from its components' keys: method family (the head selector's label without its
    temperature, `+ RRF` when fused), document order, detection fold, random seed, calibration."""
    c = key.components()
    heads, detection = c["heads"], c.get("detection")
    return {"family": names.method(key, "tau") + (" + RRF" if c["fusion"].name == "rrf" else ""),
            "order": c["prompt"].doc_order.name,
            "fold": detection.fold if detection is not None else None,
            "seed": heads.seed if heads.name == "random" else None,
            "calibrated": c["scoring"].calibration}


def study_frame(store: Store, experiment: str) -> pd.DataFrame:
    df = load_runs(store, [experiment])
    df = df[df["dataset"].notna()].copy()
    roles = pd.DataFrame([describe(k) for k in df["key"]], index=df.index)
    out = pd.concat([df, roles], axis=1)
    out.attrs.update(df.attrs)
    return out


class Study:
    """The study's runs with their per-query values, and the cells the tables need."""

    def __init__(self, df: pd.DataFrame, models: list[str], store: Store | None = None):
        self.df, self.models, self.store = df, models, store
        self.cache: dict = {}
        self.unreadable: list[str] = []

    def runs(self, model: str, family: str, order: str = "retriever", fold: int | None = 0, calibrated: bool = True) -> pd.DataFrame:
        g = self.df[(self.df["model"] == model) & (self.df["family"] == family) & (self.df["order"] == order)
                    & (self.df["calibrated"] == calibrated)]
        if family.startswith(("CoRe", "QRHead", "QR-R", "window")):
            g = g[g["fold"] == fold]
        return g

    def per_query(self, row: pd.Series, column: str = "rerank") -> pd.Series | None:
        return self.column(row, f"{column}.{COLUMN}")

    def column(self, row: pd.Series, name: str) -> pd.Series | None:
        """Any per-query column of the run (rerank.nDCG_at_10, length_bias.gal, length_bias.ratio), or None."""
        return per_query_or_none(self.store, row, name, self.cache, self.unreadable)

    def values(self, model: str, family: str, order: str = "retriever", fold: int | None = 0, calibrated: bool = True
               ) -> pd.Series | None:
        """Per-query nDCG@10 of a method (random heads: the per-query mean over its seeds)."""
        g = self.runs(model, family, order, fold, calibrated)
        series = [s for s in (self.per_query(r) for _, r in g.iterrows()) if s is not None]
        if not series:
            return None
        return pd.concat(series, axis=1).mean(axis=1) if len(series) > 1 else series[0]

    def first_stage(self, model: str) -> pd.Series | None:
        g = self.df[self.df["model"] == model]
        return None if g.empty else self.per_query(g.iloc[0], "first_stage")

    def first_stage_mean(self, model: str) -> float:
        g = self.df[self.df["model"] == model]
        return float(g.iloc[0]["metrics"][f"first_stage.{COLUMN}"]) if len(g) else float("nan")

    def means(self, model: str, family: str, order: str = "retriever", fold: int | None = 0, calibrated: bool = True
              ) -> list[float]:
        g = self.runs(model, family, order, fold, calibrated)
        return [float(m[f"rerank.{COLUMN}"]) for m in g["metrics"]]


def _ttest(a: pd.Series | None, b: pd.Series | None) -> float | None:
    from scipy.stats import ttest_rel

    if a is None or b is None:
        return None
    x, y = a.align(b, join="inner")
    if len(x) < 2 or np.allclose(x.values, y.values):
        return None
    return float(ttest_rel(x.values, y.values).pvalue)


def _lead(a: pd.Series, b: pd.Series) -> float:
    """Mean per-query difference a - b × 100 over the queries both have."""
    x, y = a.align(b, join="inner")
    return 100 * float((x - y).mean())


def _cell(values: list[float], seeds: bool = False) -> str:
    if not values:
        return ""
    if seeds and len(values) > 1:
        v = 100 * np.array(values)
        return f"{v.mean():.1f} ± {v.std(ddof=1):.1f} [{v.min():.1f}–{v.max():.1f}], n={len(v)}"
    return f"{100 * values[0]:.1f}"


def model_tests(study: Study, model: str) -> tuple[dict, dict]:
    """The model's per-query values and its Holm-corrected p-values: every method against the first stage; the chosen
    head sets against ICR and against the random draws' per-query mean; ICR against the random draws."""
    fs = study.first_stage(model)
    vals = {f: study.values(model, f) for f in METHODS}
    pvals: dict = {(f, "first stage"): _ttest(vals[f], fs) for f in METHODS}
    for f in CHOSEN:
        pvals[(f, "ICR")] = _ttest(vals[f], vals["ICR"])
    for f in (*CHOSEN, "ICR"):
        pvals[(f, "random-k8 (mean of seeds)")] = _ttest(vals[f], vals["random-k8"])
    return vals, holm({k: v for k, v in pvals.items() if v is not None})


def main_table(study: Study, alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Retriever order: every method per model with † / ‡ against the first stage, and the tests of the chosen head sets
    against ICR and random heads and of ICR against random heads (Holm per model over all of that model's tests)."""
    rows, tests = {}, []
    for model in study.models:
        vals, adjusted = model_tests(study, model)
        fs_mean = study.first_stage_mean(model)
        col = {"first stage (BM25)": f"{100 * fs_mean:.1f}" if fs_mean == fs_mean else ""}
        for f in METHODS:
            means = study.means(model, f)
            text = _cell(means, seeds=f == "random-k8")
            p = adjusted.get((f, "first stage"))
            if text and p is not None and p < alpha:
                mark = "†" if np.mean(means) > fs_mean else "‡"
                text += mark if f != "random-k8" else f" (mean {mark})"
            col[f] = text
        rows[MODEL_NAMES.get(model, model)] = col
        draws = study.means(model, "random-k8")  # one nDCG@10 per random seed
        for f, ref in [*[(f, r) for f in CHOSEN for r in ("ICR", "random-k8 (mean of seeds)")], ("ICR", "random-k8 (mean of seeds)")]:
            a, b = vals[f], vals["ICR"] if ref == "ICR" else vals["random-k8"]
            if a is None or b is None:
                continue
            mean = np.mean(study.means(model, f))
            beaten = "" if ref == "ICR" or not draws else f"{sum(mean > d for d in draws)}/{len(draws)}"
            tests.append({"model": MODEL_NAMES.get(model, model), "method": f, "against": ref,
                          "difference × 100": round(_lead(a, b), 1),
                          "p (Holm)": adjusted.get((f, ref)), "random draws it beats": beaten})
    table = pd.DataFrame(rows)
    table.index.name = "method"
    t = pd.DataFrame(tests)
    if len(t):
        t["p (Holm)"] = t["p (Holm)"].map(lambda p: "" if p is None or p != p else f"{p:.3g}")
    return table, t


def order_table(study: Study) -> pd.DataFrame:
    """nDCG@10 × 100 per model, method and document order (random heads: mean over seeds)."""
    rows = []
    for model in study.models:
        for f in ("ICR", "QRHead-k8", "CoRe-k8", "random-k8", "window-w4"):
            row = {"model": MODEL_NAMES.get(model, model), "method": f}
            for order in ORDERS:
                row[order] = _cell(study.means(model, f, order), seeds=f == "random-k8")
            if any(row[o] for o in ORDERS):
                rows.append(row)
    return pd.DataFrame(rows)


def position_control(study: Study) -> pd.DataFrame:
    """CoRe-k8's lead over random-k8 heads (per-query mean of the draws) in each document order."""
    rows = []
    for model in study.models:
        row = {"model": MODEL_NAMES.get(model, model)}
        for order in ("retriever", "shuffled", "reversed"):
            a, b = study.values(model, "CoRe-k8", order), study.values(model, "random-k8", order)
            if a is None or b is None:
                row[f"lead {order}"], row[f"p {order}"] = "", ""
                continue
            p = _ttest(a, b)
            row[f"lead {order}"] = f"{_lead(a, b):+.1f}"
            row[f"p {order}"] = "" if p is None else f"{p:.3g}"
        rows.append(row)
    return pd.DataFrame(rows)


def stability(study: Study, folds: tuple[int, ...] = (0, 1, 2)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per model and metric: the top-8 heads of each detection fold, their pairwise Jaccard and each set's nDCG@10."""
    from corexp.components.heads import jaccard, parse_head

    heads_rows, jac_rows = [], []
    for model in study.models:
        for family in ("CoRe-k8", "QRHead-k8"):
            sets = {}
            for fold in folds:
                g = study.runs(model, family, "retriever", fold)
                if len(g):
                    r = g.iloc[-1]
                    sets[fold] = [parse_head(h) for h in r["params"].get("selected_heads", "").split(",") if h]
                    heads_rows.append({"model": MODEL_NAMES.get(model, model), "metric": family, "fold": fold,
                                       "top-8 heads (layer-head)": r["params"].get("selected_heads", ""),
                                       f"{MEASURE} × 100": _cell(study.means(model, family, "retriever", fold))})
            pairs = {f"J({a},{b})": round(jaccard(sets[a], sets[b]), 2) for a, b in itertools.combinations(sorted(sets), 2)}
            if pairs:
                jac_rows.append({"model": MODEL_NAMES.get(model, model), "metric": family, **pairs,
                                 "mean": round(float(np.mean(list(pairs.values()))), 2)})
    return pd.DataFrame(heads_rows), pd.DataFrame(jac_rows)


def windows_table(study: Study) -> pd.DataFrame:
    """The layer window chosen on the detection set, per model: which layers, and its lead over ICR (paired t-test)."""
    rows = []
    for model in study.models:
        g = study.runs(model, "window-w4")
        if not len(g):
            continue
        r = g.iloc[-1]
        a, b = study.values(model, "window-w4"), study.values(model, "ICR")
        lead, p = "", None
        if a is not None and b is not None:
            lead, p = f"{_lead(a, b):+.1f}", _ttest(a, b)
        rows.append({"model": MODEL_NAMES.get(model, model), "layers [start, end)": r["params"].get("selected_window", "?"),
                     "layers run": int(r["metrics"].get("kept_layers", 0)) or "",
                     f"{MEASURE} × 100": _cell(study.means(model, "window-w4")),
                     "ICR": _cell(study.means(model, "ICR")), "lead over ICR": lead,
                     "p (paired t-test)": "" if p is None else f"{p:.3g}"})
    return pd.DataFrame(rows)


def length_bias_table(study: Study) -> pd.DataFrame:
    """CoRe's length-bias test per model and method, with and without the N/A calibration: how often the best-ranked
    relevant candidate ranks above the longest non-relevant one (GAL), over all queries with both, over those whose
    longest relevant candidate is shorter than the longest non-relevant one, and over the length-biased ones (at most
    half as long), and nDCG@10."""
    rows = []
    for model in study.models:
        for family in ("ICR", "QRHead-k8", "CoRe-k8"):
            for calibrated in (True, False):
                g = study.runs(model, family, calibrated=calibrated)
                if not len(g):
                    continue
                row = g.iloc[-1]
                m = row["metrics"]
                n, nb = int(m.get("length_bias.queries", 0)), int(m.get("length_bias.queries_biased", 0))
                gal, ratio = study.column(row, "length_bias.gal"), study.column(row, "length_bias.ratio")
                shorter = ""
                if gal is not None and ratio is not None:
                    gold_shorter = ratio < 1
                    shorter = f"{gal[gold_shorter].mean():.2f} ({int(gold_shorter.sum())})" if gold_shorter.any() else "– (0)"
                rows.append({"model": MODEL_NAMES.get(model, model), "method": family,
                             "N/A calibration": "on" if calibrated else "off",
                             f"{MEASURE} × 100": f"{100 * m[f'rerank.{COLUMN}']:.1f}",
                             "GAL, all (n)": f"{m['length_bias.gal']:.2f} ({n})" if "length_bias.gal" in m else "",
                             "GAL, gold shorter (n)": shorter,
                             "GAL, length-biased (n)": f"{m['length_bias.gal_biased']:.2f} ({nb})" if "length_bias.gal_biased" in m
                             else f"– ({nb})"})
    return pd.DataFrame(rows)


def cost(study: Study) -> pd.DataFrame:
    """CPU seconds per model and document order (all threads of the job's process, from its `cpu_time_s` metric): the
    order's costliest run (the one that computed the read-out table or a detection table) and all its runs together."""
    rows = []
    for model in study.models:
        g = study.df[study.df["model"] == model]
        for order in ORDERS:
            o = g[g["order"] == order]
            names = [f + ("" if cal else " (no calibration)") for f, cal in zip(o["family"], o["calibrated"])]
            cpu = [(float(m.get("cpu_time_s", float("nan"))), name) for m, name in zip(o["metrics"], names)]
            cpu = [(c, n) for c, n in cpu if c == c]
            if not cpu:
                continue
            top = max(cpu)
            computed = sum(max(0.0, float(m.get("queries", 0)) - float(m.get("readout_cache_hits", 0))) for m in o["metrics"])
            rows.append({"model": MODEL_NAMES.get(model, model), "order": order, "runs": len(cpu),
                         "prompts read out here": int(computed),
                         "CPU s, all runs": round(sum(c for c, _ in cpu)), "CPU s, costliest run": round(top[0]),
                         "costliest method": top[1]})
    return pd.DataFrame(rows)


def missing(study: Study, seeds: int = 5, folds: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    want = []
    for model in study.models:
        want += [(model, f, "retriever", None, True) for f in METHODS]
        want += [(model, f, "retriever", None, False) for f in ("ICR", "QRHead-k8", "CoRe-k8")]
        for order in ("reversed", "shuffled"):
            want += [(model, f, order, None, True) for f in ("ICR", "QRHead-k8", "CoRe-k8", "random-k8")]
        want += [(model, f, "retriever", fold, True) for f in ("CoRe-k8", "QRHead-k8") for fold in folds[1:]]
    out = []
    for model, f, order, fold, calibrated in want:
        n = len(study.runs(model, f, order, 0 if fold is None else fold, calibrated))
        need = seeds if f == "random-k8" else 1
        if n < need:
            what = f"{f}, {order} order" + (f", detection fold {fold}" if fold is not None else "") + \
                ("" if calibrated else ", no N/A calibration")
            out.append(f"{MODEL_NAMES.get(model, model)} × {what}" + (f" ({n} of {need} seeds)" if need > 1 else ""))
    return out


def reading(study: Study) -> list[str]:
    """The key comparisons in words, one line per model (regenerated with the tables; never written by hand)."""
    lines = []
    for model in study.models:
        vals, adjusted = model_tests(study, model)
        name = MODEL_NAMES.get(model, model)
        fs = study.first_stage_mean(model)
        parts = []
        for f in ("ICR", "CoRe-k8", "QRHead-k8", "window-w4"):
            means = study.means(model, f)
            if means:
                parts.append(f"{f} {100 * np.mean(means):.1f}")
        draws = study.means(model, "random-k8")
        if draws:
            parts.append(f"random-k8 {100 * np.mean(draws):.1f} (n={len(draws)})")
        if not parts:
            continue
        text = f"- **{name}** (BM25 {100 * fs:.1f}): " + ", ".join(parts) + "."
        comparisons = []
        for f, ref, short in (("CoRe-k8", "ICR", "ICR"), ("CoRe-k8", "random-k8 (mean of seeds)", "the random draws"),
                              ("window-w4", "ICR", "ICR")):
            a, b = vals.get(f), vals.get("ICR") if ref == "ICR" else vals.get("random-k8")
            if a is None or b is None:
                continue
            diff, p = _lead(a, b), adjusted.get((f, ref))
            verdict = "beats" if diff > 0 and p is not None and p < 0.05 else "trails" if diff < 0 and p is not None and p < 0.05 \
                else "does not differ significantly from"
            comparisons.append(f"{f} {verdict} {short} ({diff:+.1f}, Holm p = {'n/a' if p is None else f'{p:.2g}'})")
        if comparisons:
            text += " " + "; ".join(comparisons) + "."
        text += _order_reading(study, model)
        lines.append(text)
    return lines


def _order_reading(study: Study, model: str) -> str:
    """One sentence on the other document orders: ICR and CoRe-k8 there, and CoRe-k8's lead over the random draws
    (paired t-test, uncorrected, as in the position-control table); empty where no other order ran."""
    parts = []
    for order in ORDERS:
        if order == "retriever":
            continue
        icr, core = study.means(model, "ICR", order), study.means(model, "CoRe-k8", order)
        a, b = study.values(model, "CoRe-k8", order), study.values(model, "random-k8", order)
        if not icr and not core:
            continue
        said = [f"ICR {100 * np.mean(icr):.1f}" if icr else "", f"CoRe-k8 {100 * np.mean(core):.1f}" if core else ""]
        if a is not None and b is not None:
            p = _ttest(a, b)
            said.append(f"CoRe-k8 vs random {_lead(a, b):+.1f} (p = {'n/a' if p is None else f'{p:.2g}'})")
        parts.append(f"{order}: " + ", ".join(s for s in said if s))
    return (" Other orders — " + "; ".join(parts) + ".") if parts else ""


def model_sizes(study: Study) -> tuple[list[str], list[float]]:
    """The study's models that logged their parameter count, and those counts (a figure's x axis)."""
    sizes = {}
    for model in study.models:
        g = study.df[study.df["model"] == model]
        sizes[model] = next((m.get("model_parameters") for m in g["metrics"] if m.get("model_parameters")), None)
    models = [m for m in study.models if sizes.get(m)]
    return models, [sizes[m] for m in models]


def study_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """The options every study report takes: the store, the models, the output file and the README reading."""
    ap.add_argument("--tracking-uri", default=f"sqlite:///{project_root()}/mlflow.db")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--out", default=str(project_root() / "docs" / out))
    ap.add_argument("--readme", action="store_true", help="also rewrite the README's reading between its markers")


def figure(study: Study, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    models, x = model_sizes(study)
    for ax, order in zip(axes, ("retriever", "shuffled")):
        fs = [study.first_stage_mean(m) for m in models]
        if fs:
            ax.axhline(100 * fs[0], color="black", ls="--", lw=1, label="BM25 (first stage)")
        for f, style in (("ICR", "s-"), ("QRHead-k8", "^-"), ("QR-R-k8", "x:"), ("CoRe-k8", "o-"), ("window-w4", "v-"),
                         ("CoRe-k8 + RRF", "D:")):
            if order != "retriever" and f == "CoRe-k8 + RRF":
                continue
            pts = [(s, 100 * np.mean(study.means(m, f, order))) for m, s in zip(models, x) if study.means(m, f, order)]
            if pts:
                ax.plot(*zip(*pts), style, label=f)
        band = [(s, 100 * np.array(study.means(m, "random-k8", order))) for m, s in zip(models, x)
                if study.means(m, "random-k8", order)]
        if band:
            xs = [s for s, _ in band]
            ax.plot(xs, [v.mean() for _, v in band], "x-", color="gray", label="random-k8 (mean, min–max)")
            ax.fill_between(xs, [v.min() for _, v in band], [v.max() for _, v in band], color="gray", alpha=0.2)
        ax.set_xscale("log")
        ax.minorticks_off()  # the models' names are the ticks; log-scale minor labels would overprint them
        ax.set_xticks(x, [MODEL_NAMES.get(m, m).replace("-", "\n", 1) for m in models], fontsize=7)
        ax.set_xlabel("model size (parameters, log scale)")
        ax.set_title(f"DL19, BM25 top-20, documents in {order} order", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{MEASURE} × 100")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _md(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_markdown(index=index) if len(frame) else "(no runs)"


def write(uri: str, experiment: str, out: Path, models: list[str]) -> tuple[list[Path], str, list[str]]:
    store = Store(uri)
    df = study_frame(store, experiment)
    study = Study(df, [m for m in models if m in set(df["model"])] or models, store)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    main, tests = main_table(study)
    orders, control = order_table(study), position_control(study)
    heads, jac = stability(study)
    fig = figure(study, folder / "ndcg_vs_model_size.png")
    queries = sorted({int(q) for q in df["queries"] if q == q})
    said = reading(study)
    md = [f"# Attention re-ranking across model sizes ({experiment})\n",
          f"TREC DL19 ({', '.join(map(str, queries))} queries), the BM25 top-20 of the shipped run, {MEASURE} × 100, fp32. "
          "Heads (QRHead-k8, CoRe-k8) and the layer window (window-w4: the 4 consecutive layers whose summed attention ranks "
          "the positive best) are chosen on 40 queries of the SciFact train split (`detection=scifact_train`, fold 0; "
          "disjoint from DL19); random-k8 over five seeds, shown as mean ± standard deviation [min–max]. † / ‡: "
          "significantly better / worse than the first stage (paired t-test over queries, Holm-corrected per model, "
          "p < 0.05). Generated by `python -m corexp.studies.scaling` from the runs of `scripts/scaling_study.py`.\n",
          "## Reading (generated from the tests below)\n", *said, "",
          "## nDCG@10 by model size (documents in retriever order, the CoRe protocol)\n", _md(main, True), "",
          f"![nDCG@10 against model size]({folder.name}/{fig.name})\n",
          "## The chosen head sets against ICR and against random heads (and ICR against random heads)\n",
          "Paired t-tests over queries against ICR and against the per-query mean of the random-k8 draws (Holm per "
          "model, together with the tests against the first stage); the last column: how many random draws' nDCG@10 the "
          "method's exceeds.\n", _md(tests), "",
          "## Layer windows\n", "The window of 4 consecutive layers chosen on the detection set (`heads=window`; never on "
          "DL19), and its difference to ICR (all layers). Every window's own nDCG@10, and the oracle windows, are in "
          "docs/atlas.md.\n", _md(windows_table(study)), "",
          "## Length bias, with and without the N/A calibration\n",
          "CoRe's length-bias test (its `length_bias_test.py`): GAL = share of queries whose best-ranked relevant "
          "candidate (judged > 0) ranks above the longest non-relevant candidate (words as the prompt shows them, "
          "`prompt.max_words=100`); over all queries with both, over those whose longest relevant candidate is shorter "
          "than the longest non-relevant one, and over the length-biased ones of CoRe's test (at most half as long: few "
          "on DL19, whose passages are short). `scoring.calibration=false` scores s(q) alone, without subtracting the N/A "
          "query.\n",
          _md(length_bias_table(study)), "",
          "## Document order\n", "Retriever order (top-1 first), reversed (top-1 last: ICR's and QRHead's BEIR setting) "
          "and shuffled (one seeded permutation per query, the same for every method).\n", _md(orders), "",
          "## Position-bias control: CoRe-k8's lead over random-k8 heads\n",
          "Lead = mean per-query difference to the per-query mean of the random draws; p: paired t-test (uncorrected).\n",
          _md(control), "",
          "## Head-set stability across three disjoint detection sets\n",
          "Top-8 heads detected on folds 0, 1 and 2 of the SciFact train split (40 queries each, no query shared), "
          "their pairwise Jaccard, and the DL19 nDCG@10 of each detected set (retriever order).\n", _md(jac), "",
          _md(heads) if len(heads) else "", ""]
    spent = cost(study)
    md += ["## CPU time\n", "CPU seconds of each job's process (all threads; `cpu_time_s`). Within one model and order the "
           "first job computes every head's read-out per prompt and later jobs only re-score it (`readout_cache=true`); "
           "a job that detects heads on a new fold pays for detection too. Where no prompt was read out here, an earlier "
           "run (an older code version whose read-out is identical: the cache key holds the attention code's digest) "
           "computed the table and these runs only re-scored it.\n", _md(spent), ""]
    gaps = missing(study)
    md += ["## Missing cells\n", "\n".join(f"- {m}" for m in gaps) if gaps else "None: every cell has its runs.", ""]
    md += [f"Every number comes from a run of the current code ({df.attrs.get('current_code')}) unless listed here.\n"]
    if df.attrs.get("older_code"):
        md += ["## Numbers from older code\n", *[f"- {x}" for x in df.attrs["older_code"]], ""]
    if study.unreadable:
        md += ["## Runs without usable per-query results (no test)\n", *[f"- {x}" for x in study.unreadable], ""]
    out.write_text("\n".join(md) + "\n")
    return [out, fig], "\n".join(md), said


def write_markdown(out: Path, lines: list[str]) -> str:
    """A study document: its lines joined, written to `out` (its folder made), returned as text."""
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def update_readme(lines: list[str], readme: Path, markers: tuple[str, str] = README_MARKERS) -> None:
    """Rewrite a generated reading (docs/scaling.md's by default) in the README between its markers."""
    text = readme.read_text()
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    readme.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.studies.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="scaling")
    study_arguments(ap, "scaling.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def body() -> None:
        written, md, said = write(args.tracking_uri, args.experiment, Path(args.out), args.models.split(","))
        if args.readme:
            update_readme(said, project_root() / "README.md")
        print(md)
        print("\nwritten:", *written, sep="\n  ")

    return cli_main("corexp.scaling", body)


if __name__ == "__main__":
    sys.exit(main())
