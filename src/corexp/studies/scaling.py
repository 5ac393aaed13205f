"""The scaling study's report (docs/scaling.md), built from the runs of one MLflow experiment (scripts/scaling_study.py):

    python -m corexp.studies.scaling --experiment scaling --out docs/scaling.md [--models smollm2,gemma3,qwen25coder,qwen25coder15]

Per model size: nDCG@10 of ICR, QRHead-k8, CoRe-k8, random-k8 heads (a distribution over seeds: mean, spread, and the
tests against the per-query mean of the draws), CoRe-k8 + RRF with the first stage, in the retriever order (the CoRe
protocol), the reversed order (top-1 last, ICR's and QRHead's) and a shuffled order (the same permutation per query for
every method: the position-bias control); the head sets detected on disjoint detection folds (Jaccard, and each set's
nDCG@10); a figure of nDCG@10 against model size. Every number comes from a run; a cell without one is listed as
missing, never estimated.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from corexp.config import project_root
from corexp.errors import CorexpError
from corexp.report.tables import holm, load_runs, per_query_or_none

MEASURE = "nDCG@10"
ORDERS = ("retriever", "reversed", "shuffled")
METHODS = ("ICR", "QRHead-k8", "CoRe-k8", "random-k8", "CoRe-k8 + RRF")
DEFAULT_MODELS = ("smollm2", "gemma3", "qwen25coder", "qwen25coder15")
MODEL_NAMES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M", "qwen25coder": "Qwen2.5-Coder-0.5B",
               "qwen25coder15": "Qwen2.5-Coder-1.5B"}


def describe(row: pd.Series) -> dict:
    """A run's place in the study: model, method family, document order, fusion, detection fold, random seed."""
    labels = row["labels"]
    extras = {e["text"] for e in labels.extras}
    family = labels.method.split(" ")[0]  # ICR | CoRe-k8 | QRHead-k8 | random-k8 | ...
    if "fusion=rrf" in extras:
        family += " + RRF"
    order = "reversed" if "reversed" in extras else "shuffled" if "shuffled" in extras else "retriever"
    params = row["params"]
    fold = params.get("detection.fold") if family.startswith(("CoRe", "QRHead")) else None
    seed = params.get("heads.seed") if family.startswith("random") else None
    return {"family": family, "order": order, "fold": None if fold in (None, "None") else int(fold),
            "seed": None if seed in (None, "None") else int(seed)}


def study_frame(uri: str, experiment: str) -> pd.DataFrame:
    df = load_runs(uri, [experiment], per_cell=False)
    df = df[df["dataset"].notna()].copy()
    roles = pd.DataFrame([describe(r) for _, r in df.iterrows()], index=df.index)
    out = pd.concat([df, roles], axis=1)
    out.attrs.update(df.attrs)
    return out


class Study:
    """The study's runs with their per-query values, and the cells the tables need."""

    def __init__(self, df: pd.DataFrame, models: list[str]):
        self.df, self.models = df, models
        self.cache: dict = {}
        self.unreadable: list[str] = []

    def runs(self, model: str, family: str, order: str = "retriever", fold: int | None = 0) -> pd.DataFrame:
        g = self.df[(self.df["model"] == model) & (self.df["family"] == family) & (self.df["order"] == order)]
        if family.startswith(("CoRe", "QRHead")):
            g = g[g["fold"] == fold]
        return g

    def per_query(self, row: pd.Series, column: str = "rerank") -> pd.Series | None:
        pq = per_query_or_none(row["run_id"], row["run_name"], self.cache, self.unreadable)
        return None if pq is None else pq[f"{column}.{MEASURE}"]

    def values(self, model: str, family: str, order: str = "retriever", fold: int | None = 0) -> pd.Series | None:
        """Per-query nDCG@10 of a method (random heads: the per-query mean over its seeds)."""
        g = self.runs(model, family, order, fold)
        series = [s for s in (self.per_query(r) for _, r in g.iterrows()) if s is not None]
        if not series:
            return None
        return pd.concat(series, axis=1).mean(axis=1) if len(series) > 1 else series[0]

    def first_stage(self, model: str) -> pd.Series | None:
        g = self.df[self.df["model"] == model]
        return None if g.empty else self.per_query(g.iloc[0], "first_stage")

    def means(self, model: str, family: str, order: str = "retriever", fold: int | None = 0) -> list[float]:
        g = self.runs(model, family, order, fold)
        return [float(m[f"rerank.{MEASURE.replace('@', '_at_')}"]) for m in g["metrics"]]


def _ttest(a: pd.Series | None, b: pd.Series | None) -> float | None:
    from scipy.stats import ttest_rel

    if a is None or b is None:
        return None
    x, y = a.align(b, join="inner")
    if len(x) < 2 or np.allclose(x.values, y.values):
        return None
    return float(ttest_rel(x.values, y.values).pvalue)


def _cell(values: list[float], seeds: bool = False) -> str:
    if not values:
        return ""
    if seeds and len(values) > 1:
        v = 100 * np.array(values)
        return f"{v.mean():.1f} ± {v.std(ddof=1):.1f} [{v.min():.1f}–{v.max():.1f}], n={len(v)}"
    return f"{100 * values[0]:.1f}"


def main_table(study: Study, alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Retriever order: every method per model with † / ‡ against the first stage, and the CoRe / QRHead tests against
    ICR and against random heads, ICR's against random heads (Holm per model over all of that model's tests)."""
    rows, tests = {}, []
    for model in study.models:
        fs = study.first_stage(model)
        pvals: dict = {}
        vals = {f: study.values(model, f) for f in METHODS}
        for f in METHODS:
            pvals[(f, "first stage")] = _ttest(vals[f], fs)
        for f in ("CoRe-k8", "QRHead-k8"):
            pvals[(f, "ICR")] = _ttest(vals[f], vals["ICR"])
        for f in ("CoRe-k8", "QRHead-k8", "ICR"):
            pvals[(f, "random-k8 (mean of seeds)")] = _ttest(vals[f], vals["random-k8"])
        adjusted = holm({k: v for k, v in pvals.items() if v is not None})
        g = study.df[study.df["model"] == model]
        fs_mean = float(g.iloc[0]["metrics"][f"first_stage.{MEASURE.replace('@', '_at_')}"]) if len(g) else float("nan")
        col = {"first stage (BM25)": f"{100 * fs_mean:.1f}" if fs_mean == fs_mean else ""}
        for f in METHODS:
            means = study.means(model, f)
            text = _cell(means, seeds=f == "random-k8")
            p = adjusted.get((f, "first stage"))
            if text and p is not None and p < alpha and f != "random-k8":
                text += "†" if np.mean(means) > fs_mean else "‡"
            elif text and p is not None and p < alpha:
                text += " (mean " + ("†" if np.mean(means) > fs_mean else "‡") + ")"
            col[f] = text
        rows[MODEL_NAMES.get(model, model)] = col
        draws = study.means(model, "random-k8")  # one nDCG@10 per random seed
        pairs = [(f, ref) for f in ("CoRe-k8", "QRHead-k8") for ref in ("ICR", "random-k8 (mean of seeds)")]
        for f, ref in [*pairs, ("ICR", "random-k8 (mean of seeds)")]:
            a, b = vals[f], vals["ICR"] if ref == "ICR" else vals["random-k8"]
            if a is None or b is None:
                continue
            x, y = a.align(b, join="inner")
            mean = np.mean(study.means(model, f))
            beaten = "" if ref == "ICR" or not draws else f"{sum(mean > d for d in draws)}/{len(draws)}"
            tests.append({"model": MODEL_NAMES.get(model, model), "method": f, "against": ref,
                          "difference × 100": round(100 * float((x - y).mean()), 1),
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
        for f in ("ICR", "QRHead-k8", "CoRe-k8", "random-k8"):
            row = {"model": MODEL_NAMES.get(model, model), "method": f}
            for order in ORDERS:
                means = study.means(model, f, order)
                row[order] = _cell(means, seeds=f == "random-k8")
            rows.append(row)
    return pd.DataFrame(rows)


def position_control(study: Study) -> pd.DataFrame:
    """CoRe-k8's lead over random-k8 heads (per-query mean of the draws) in retriever order and with shuffled documents."""
    rows = []
    for model in study.models:
        row = {"model": MODEL_NAMES.get(model, model)}
        for order in ("retriever", "shuffled", "reversed"):
            a, b = study.values(model, "CoRe-k8", order), study.values(model, "random-k8", order)
            if a is None or b is None:
                row[f"lead {order}"], row[f"p {order}"] = "", ""
                continue
            x, y = a.align(b, join="inner")
            p = _ttest(a, b)
            row[f"lead {order}"] = f"{100 * float((x - y).mean()):+.1f}"
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


def cost(study: Study) -> pd.DataFrame:
    """CPU seconds per model and document order (all threads of the job's process, from its `cpu_time_s` metric): the
    order's costliest run (the one that computed the read-out table or a detection table) and all its runs together."""
    rows = []
    for model in study.models:
        g = study.df[study.df["model"] == model]
        for order in ORDERS:
            o = g[g["order"] == order]
            cpu = [(float(m.get("cpu_time_s", float("nan"))), name) for m, name in zip(o["metrics"], o["run_name"])]
            cpu = [(c, n) for c, n in cpu if c == c]
            if not cpu:
                continue
            top = max(cpu)
            computed = sum(max(0.0, float(m.get("queries", 0)) - float(m.get("readout_cache_hits", 0))) for m in o["metrics"])
            rows.append({"model": MODEL_NAMES.get(model, model), "order": order, "runs": len(cpu),
                         "prompts read out here": int(computed),
                         "CPU s, all runs": round(sum(c for c, _ in cpu)), "CPU s, costliest run": round(top[0]),
                         "costliest run": top[1]})
    return pd.DataFrame(rows)


def missing(study: Study, seeds: int = 5, folds: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    want = []
    for model in study.models:
        for f in METHODS:
            want.append((model, f, "retriever", None))
        for order in ("reversed", "shuffled"):
            want += [(model, f, order, None) for f in ("ICR", "QRHead-k8", "CoRe-k8", "random-k8")]
        want += [(model, f, "retriever", fold) for f in ("CoRe-k8", "QRHead-k8") for fold in folds[1:]]
    out = []
    for model, f, order, fold in want:
        n = len(study.runs(model, f, order, 0 if fold is None else fold))
        need = seeds if f == "random-k8" else 1
        if n < need:
            what = f"{f}, {order} order" + (f", detection fold {fold}" if fold is not None else "")
            out.append(f"{MODEL_NAMES.get(model, model)} × {what}" + (f" ({n} of {need} seeds)" if need > 1 else ""))
    return out


def figure(study: Study, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    sizes = {}
    for model in study.models:
        g = study.df[study.df["model"] == model]
        sizes[model] = next((m.get("model_parameters") for m in g["metrics"] if m.get("model_parameters")), None)
    models = [m for m in study.models if sizes.get(m)]
    x = [sizes[m] for m in models]
    for ax, order in zip(axes, ("retriever", "shuffled")):
        fs = [float(study.df[study.df["model"] == m].iloc[0]["metrics"][f"first_stage.{MEASURE.replace('@', '_at_')}"])
              for m in models]
        if fs:
            ax.axhline(100 * fs[0], color="black", ls="--", lw=1, label="BM25 (first stage)")
        for f, style in (("ICR", "s-"), ("QRHead-k8", "^-"), ("CoRe-k8", "o-"), ("CoRe-k8 + RRF", "D:")):
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


def write(uri: str, experiment: str, out: Path, models: list[str]) -> tuple[list[Path], str]:
    df = study_frame(uri, experiment)
    study = Study(df, [m for m in models if m in set(df["model"])] or models)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    main, tests = main_table(study)
    orders, control = order_table(study), position_control(study)
    heads, jac = stability(study)
    fig = figure(study, folder / "ndcg_vs_model_size.png")
    queries = sorted({int(q) for q in df["queries"] if q == q})
    md = [f"# Attention re-ranking across model sizes ({experiment})\n",
          f"TREC DL19 ({', '.join(map(str, queries))} queries), the BM25 top-20 of the shipped run, {MEASURE} × 100. Heads "
          "(QRHead-k8, CoRe-k8) detected on 40 queries of the SciFact train split (`detection=scifact_train`, fold 0; "
          "disjoint from DL19); random-k8 over several seeds, shown as mean ± standard deviation [min–max]. "
          "† / ‡: significantly better / worse than the first stage (paired t-test over queries, Holm-corrected per "
          "model, p < 0.05). Generated by `python -m corexp.studies.scaling` from the runs of `scripts/scaling_study.py`.\n",
          "## nDCG@10 by model size (documents in retriever order, the CoRe protocol)\n", main.to_markdown(), "",
          f"![nDCG@10 against model size]({folder.name}/{fig.name})\n",
          "## CoRe and QRHead against ICR and against random heads (and ICR against random heads)\n",
          "Paired t-tests over queries against ICR and against the per-query mean of the random-k8 draws (Holm per "
          "model, together with the tests against the first stage); the last column: how many random draws' nDCG@10 the "
          "method's exceeds.\n", tests.to_markdown(index=False) if len(tests) else "(no runs)", "",
          "## Document order\n", "Retriever order (top-1 first), reversed (top-1 last: ICR's and QRHead's BEIR setting) "
          "and shuffled (one seeded permutation per query, the same for every method).\n",
          orders.to_markdown(index=False), "",
          "## Position-bias control: CoRe-k8's lead over random-k8 heads\n",
          "Lead = mean per-query difference to the per-query mean of the random draws; p: paired t-test (uncorrected).\n",
          control.to_markdown(index=False), "",
          "## Head-set stability across three disjoint detection sets\n",
          "Top-8 heads detected on folds 0, 1 and 2 of the SciFact train split (40 queries each, no query shared), "
          "their pairwise Jaccard, and the DL19 nDCG@10 of each detected set (retriever order).\n",
          jac.to_markdown(index=False) if len(jac) else "(no runs)", "",
          heads.to_markdown(index=False) if len(heads) else "", ""]
    spent = cost(study)
    md += ["## CPU time\n", "CPU seconds of each job's process (all threads; `cpu_time_s`). Within one model and order the "
           "first job computes every head's read-out per prompt and later jobs only re-score it (`readout_cache=true`); "
           "a job that detects heads on a new fold pays for detection too. Where no prompt was read out here, an earlier run "
           "(an older code version whose read-out is identical: the cache key holds the attention code's digest) "
           "computed the table and these runs only re-scored it.\n",
           spent.to_markdown(index=False) if len(spent) else "(no runs)", ""]
    gaps = missing(study)
    md += ["## Missing cells\n", "\n".join(f"- {m}" for m in gaps) if gaps else "None: every cell has its runs.", ""]
    if df.attrs.get("older_code"):
        md += ["## Configs with runs of older code\n", *[f"- {x}" for x in df.attrs["older_code"]], ""]
    if study.unreadable:
        md += ["## Runs without per-query results (no test)\n", *[f"- {x}" for x in study.unreadable], ""]
    out.write_text("\n".join(md) + "\n")
    return [out, fig], "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.studies.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{project_root()}/mlflow.db")
    ap.add_argument("--experiment", default="scaling")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--out", default=str(project_root() / "docs" / "scaling.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        written, md = write(args.tracking_uri, args.experiment, Path(args.out), args.models.split(","))
    except CorexpError as err:
        print(f"corexp.studies.scaling: error: {err}", file=sys.stderr)
        return 2
    print(md)
    print("\nwritten:", *written, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
