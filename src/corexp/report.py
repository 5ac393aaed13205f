"""Paper-style tables from the MLflow store: methods x datasets per model, paired tests vs a baseline, references.

    python -m corexp.report --experiment foundation [--baseline BM25] [--measure nDCG@10] [--out reports/foundation]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from corexp.config import project_root
from corexp.errors import CorexpError
from corexp.evaluation import parse_measures, safe_name
from corexp.labels import method_label

DATASET_ORDER = ["trec-covid", "nfcorpus", "fiqa", "arguana", "webis-touche2020", "dbpedia-entity", "scidocs",
                 "climate-fever", "scifact", "scifact-sample", "nq", "hotpotqa", "fever", "quora", "msmarco-dev", "dl19", "dl20"]
# METHOD.md §7: Anserini BM25 and QRHead Table 2 (Llama-3.1-8B, BM25 top-200), nDCG@10.
REFERENCE = {
    ("reference", "BM25 (Anserini)"): {"scifact": 0.6789, "nfcorpus": 0.3218, "dl19": 0.5058, "dl20": 0.4796},
    ("reference", "ICR, Llama-3.1-8B (QRHead paper)"): {"nq": .540, "trec-covid": .733, "nfcorpus": .348, "fiqa": .356,
                                                        "scifact": .755, "scidocs": .190, "fever": .858, "climate-fever": .248,
                                                        "dbpedia-entity": .369},
    ("reference", "QRHead, Llama-3.1-8B (QRHead paper)"): {"nq": .586, "trec-covid": .775, "nfcorpus": .353, "fiqa": .391,
                                                           "scifact": .762, "scidocs": .194, "fever": .853, "climate-fever": .239,
                                                           "dbpedia-entity": .372},
}


def load_runs(uri: str, experiments: list[str]) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=experiments, output_format="list")
    rows = []
    for r in runs:
        if r.info.status != "FINISHED" or r.data.tags.get("sweep") == "parent":
            continue
        p = r.data.params
        rows.append({"run_id": r.info.run_id, "start": r.info.start_time, "model": p.get("model.name"),
                     "dataset": p.get("data.name"), "method": method_label(p), "params": p, "metrics": r.data.metrics,
                     "queries": p.get("data.max_queries")})
    if not rows:
        raise CorexpError(f"no FINISHED runs in experiment(s) {experiments} of {uri}")
    df = pd.DataFrame(rows).sort_values("start")
    return df.groupby(["model", "dataset", "method"], as_index=False).last()  # latest run per cell


def per_query(run_id: str, cache: dict) -> pd.DataFrame:
    import mlflow

    if run_id not in cache:
        path = mlflow.MlflowClient().download_artifacts(run_id, "per_query.csv")
        cache[run_id] = pd.read_csv(path, dtype={"query_id": str}).set_index("query_id")
    return cache[run_id]


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values."""
    items = sorted(pvalues.items(), key=lambda kv: kv[1])
    m, running, out = len(items), 0.0, {}
    for i, (k, p) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def build_tables(df: pd.DataFrame, measure: str, baseline: str, alpha: float = 0.05) -> dict[str, pd.DataFrame]:
    from scipy.stats import ttest_rel

    col_rr, col_fs = f"rerank.{measure}", f"first_stage.{measure}"
    metric_key = safe_name(parse_measures([measure])[0])  # the name run.py logged
    tables, cache = {}, {}
    for model, g in df.groupby("model"):
        values: dict[tuple[str, str], float] = {}
        queries: dict[tuple[str, str], pd.Series] = {}
        for _, row in g.iterrows():
            m = row["metrics"]
            values[(row["method"], row["dataset"])] = m.get(f"rerank.{metric_key}", np.nan)
            values.setdefault(("BM25", row["dataset"]), m.get(f"first_stage.{metric_key}", np.nan))
            try:
                pq = per_query(row["run_id"], cache)
                queries[(row["method"], row["dataset"])] = pq[col_rr]
                queries.setdefault(("BM25", row["dataset"]), pq[col_fs])
            except Exception:  # noqa: BLE001 - a run without the artifact just gets no test
                pass
        pvals = {}
        for (method, ds), series in queries.items():
            base = queries.get((baseline, ds))
            if method == baseline or base is None:
                continue
            a, b = series.align(base, join="inner")
            if len(a) > 1 and not np.allclose(a.values, b.values):
                pvals[(method, ds)] = float(ttest_rel(a.values, b.values).pvalue)
        adjusted = holm(pvals)
        datasets = sorted({d for _, d in values}, key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else 99, d))
        methods = ["BM25"] + sorted({m for m, _ in values} - {"BM25"})
        table = pd.DataFrame(index=methods, columns=datasets + ["avg"], dtype=object)
        for method in methods:
            nums = []
            for ds in datasets:
                v = values.get((method, ds), np.nan)
                if np.isnan(v):
                    table.loc[method, ds] = ""
                    continue
                nums.append(v)
                p = adjusted.get((method, ds))
                mark = "" if p is None else ("†" if p < alpha and v > values.get((baseline, ds), np.nan) else "‡" if p < alpha else "")
                table.loc[method, ds] = f"{100 * v:.1f}{mark}"
            table.loc[method, "avg"] = f"{100 * np.mean(nums):.1f}" if len(nums) == len(datasets) else ""
        for (_, ref_name), ref in REFERENCE.items():
            if any(d in ref for d in datasets):
                table.loc[ref_name] = [f"{100 * ref[d]:.1f}" if d in ref else "" for d in datasets] + [""]
        table.index.name = "method"
        tables[model] = table
    return tables


def head_figure(df: pd.DataFrame, model: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = df[(df["model"] == model)]
    sel = {}
    for _, row in g.iterrows():
        heads = row["params"].get("selected_heads", "all")
        if heads and heads != "all":
            sel.setdefault(row["method"], [int(h.split("-")[0]) for h in heads.split(",")])
    if not sel:
        return None
    n_layers = int(max(g["metrics"].apply(lambda m: m.get("kept_layers", 0)).max(), max(max(v) for v in sel.values()) + 1))
    fig, ax = plt.subplots(figsize=(8, 3))
    width = 0.8 / len(sel)
    for i, (method, layers) in enumerate(sorted(sel.items())):
        counts = np.bincount(layers, minlength=n_layers)
        ax.bar(np.arange(n_layers) + i * width, counts, width=width, label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel("selected heads")
    ax.set_title(f"{model}: layers of the selected heads", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def write_report(uri: str, experiments: list[str], out: Path, measure: str, baseline: str) -> list[Path]:
    df = load_runs(uri, experiments)
    tables = build_tables(df, measure, baseline)
    out.mkdir(parents=True, exist_ok=True)
    written, md = [], [f"# {measure} by model ({', '.join(experiments)})\n",
                       f"† significantly better than {baseline}, ‡ significantly worse (paired t-test over queries, "
                       "Holm-corrected per model, p < 0.05). Reference rows: published numbers (docs/METHOD.md §7).\n"]
    for model, table in sorted(tables.items()):
        md += [f"\n## {model}\n", table.to_markdown(), ""]
        table.to_csv(out / f"{model}.csv")
        (out / f"{model}.tex").write_text(table.to_latex(escape=True))
        written += [out / f"{model}.csv", out / f"{model}.tex"]
        fig = head_figure(df, model, out / f"{model}_head_layers.png")
        if fig:
            written.append(fig)
    (out / "report.md").write_text("\n".join(md) + "\n")
    written.append(out / "report.md")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.report", description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{project_root()}/mlflow.db")
    ap.add_argument("--experiment", action="append", default=None, help="MLflow experiment (repeatable; default corexp)")
    ap.add_argument("--measure", default="nDCG@10")
    ap.add_argument("--baseline", default="BM25", help="method label the paired tests compare against")
    ap.add_argument("--out", default=None, help="output folder (default <root>/reports/<experiment>)")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's artifact is noise here
    experiments = args.experiment or ["corexp"]
    out = Path(args.out) if args.out else project_root() / "reports" / "_".join(experiments)
    try:
        for p in write_report(args.tracking_uri, experiments, out, args.measure, args.baseline):
            print(p)
    except CorexpError as err:
        print(f"corexp.report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
