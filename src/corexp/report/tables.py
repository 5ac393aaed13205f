"""Paper-style tables from the MLflow store: methods x datasets per model, paired tests, BEIR averages, references.

    python -m corexp.report --experiment results [--measure nDCG@10] [--baseline first-stage] [--out docs/...]
    python -m corexp.report --experiment pruning --vs truncation.fraction      # the pruning study: figure + table

Runs are read through corexp.tracking.tracker.Store (read only: a mistyped --tracking-uri never creates a store). Each
config is represented by its run of the current code where one exists, else by its newest run, and every number of
older code is named with its code digest. Runs that differ only in a seed (random heads) are one cell shown as a
distribution: mean ± sd [min–max], n. A per-query table is used only when it holds the run's queries and the
measure. BEIR is averaged as the papers do: CQADupStack's 12 forums (data=cqadupstack-<forum>) are first averaged into
one number, then the 15 BEIR sets are averaged ("BEIR-15", shown when all 15 are present). Cells of the model x method
x data set grid that have no finished run are listed as missing, never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from corexp.data.evaluation import metric_key, parse_measures
from corexp.errors import CorexpError, cli_main
from corexp.locations import project_root
from corexp.tracking import names
from corexp.tracking.identity import RunKey, code_digest
from corexp.tracking.tracker import Store

BEIR_15 = ["trec-covid", "nfcorpus", "fiqa", "arguana", "webis-touche2020", "dbpedia-entity", "scidocs",
           "climate-fever", "scifact", "nq", "hotpotqa", "fever", "quora", "cqadupstack", "msmarco-dev"]
CQA_FORUMS = ["android", "english", "gaming", "gis", "mathematica", "physics", "programmers", "stats", "tex", "unix",
              "webmasters", "wordpress"]
DATASET_ORDER = [*BEIR_15, "scifact-sample", "scifact50", "dl19", "dl20"]
# METHOD.md §7: Anserini BM25 and QRHead Table 2 (Llama-3.1-8B, BM25 top-200), nDCG@10.
REFERENCE = {
    "BM25 (Anserini)": {"scifact": 0.6789, "nfcorpus": 0.3218, "dl19": 0.5058, "dl20": 0.4796},
    "ICR, Llama-3.1-8B (QRHead paper)": {"nq": .540, "trec-covid": .733, "nfcorpus": .348, "fiqa": .356, "scifact": .755,
                                         "scidocs": .190, "fever": .858, "climate-fever": .248, "dbpedia-entity": .369},
    "QRHead, Llama-3.1-8B (QRHead paper)": {"nq": .586, "trec-covid": .775, "nfcorpus": .353, "fiqa": .391, "scifact": .762,
                                            "scidocs": .194, "fever": .853, "climate-fever": .239, "dbpedia-entity": .372},
}


def load_runs(store: Store, experiments: list[str]) -> pd.DataFrame:
    """FINISHED runs, one per config (its identity's config hash): its run of the current code where one exists, else
    its newest. The `code` column says "current" or the older code's digest; `attrs["older_code"]` names the configs
    whose numbers come from older code. Configs of one (model, data set, method) cell differ only in a seed and are
    reported together, as a distribution."""
    current = code_digest()
    rows = []
    for r in store.finished_runs(experiments):
        tags, key = r.tags, RunKey.from_params(r.params)
        if key is None:
            raise CorexpError(f"run {r.run_id} ({r.name}) has no component keys: it was logged by an older corexp; add "
                              f"them with `python -m corexp.migrate --experiment {experiments[0]}`, or rerun it")
        rows.append({"run_id": r.run_id, "run_name": r.name, "start": r.start_ms, "model": key["model"].name,
                     "dataset": key["data"].name, "method": names.method_label(key), "first_stage": key["first_stage"].label(),
                     "key": key, "params": r.params, "metrics": r.metrics, "queries": r.metrics.get("queries"),
                     "config_hash": tags.get("config_hash"), "code_digest": tags.get("code_digest", "")})
    if not rows:
        raise CorexpError(f"no FINISHED runs in experiment(s) {', '.join(experiments)} of {store.uri}")
    df = pd.DataFrame(rows).sort_values("start")
    chosen, older = [], []
    for _, g in df.groupby("config_hash", sort=False):
        now = g[g["code_digest"] == current]
        row = (now if len(now) else g).iloc[-1].copy()
        row["code"] = "current" if len(now) else row["code_digest"]
        if not len(now):
            older.append(f"{row['run_name']}: from code {row['code_digest']} (no run of the current code {current})")
        chosen.append(row)
    out = pd.DataFrame(chosen).sort_values("start").reset_index(drop=True)
    out.attrs["older_code"] = older
    out.attrs["current_code"] = current
    return out


def logged_measures(df: pd.DataFrame) -> list[str]:
    return sorted({m for p in df["params"] for m in json.loads(p.get("data.measures", "[]"))})


def check_measure(df: pd.DataFrame, measure: str) -> Any:
    """The parsed measure, when the runs logged it; else one line naming the measures they did log."""
    parsed = parse_measures([measure])[0]
    if not any(metric_key("rerank", parsed) in m for m in df["metrics"]):
        raise CorexpError(f"measure {measure} was not logged by these runs; logged: {', '.join(logged_measures(df)) or 'none'} "
                          "(add it to data.measures and rerun, or choose --measure among them)")
    return parsed


def per_query(store: Store, row: Any, cache: dict) -> pd.DataFrame:
    """The run's per-query table, checked: one row per query the run evaluated."""
    run_id = row["run_id"]
    if run_id not in cache:
        table = pd.read_csv(store.artifact(run_id, "per_query.csv"), dtype={"query_id": str}).set_index("query_id")
        expected = row.get("queries")
        repeated = table.index[table.index.duplicated()]
        if len(repeated):
            raise ValueError(f"per_query.csv lists query {repeated[0]} {int((table.index == repeated[0]).sum())} times "
                             "(an edited or concatenated table)")
        if expected is not None and expected == expected and len(table) != int(expected):
            raise ValueError(f"per_query.csv has {len(table)} queries, the run evaluated {int(expected)} (a cut table)")
        cache[run_id] = table
    return cache[run_id]


def per_query_or_none(store: Store, row: Any, column: str, cache: dict, unreadable: list[str]) -> pd.Series | None:
    """One column of the run's per-query table; a run whose table cannot be read, is cut short or lacks the column is
    named in `unreadable` (no paired test for it)."""
    where = f"{row.get('run_name', row['run_id'])} ({row['run_id']})"
    try:
        table = per_query(store, row, cache)
    except (OSError, ValueError, KeyError) as err:
        unreadable.append(f"{where}: per_query.csv unusable ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
        return None
    except Exception as err:
        if type(err).__name__ != "MlflowException":
            raise
        unreadable.append(f"{where}: per_query.csv missing ({str(err).splitlines()[0][:120]})")
        return None
    if column not in table.columns:
        unreadable.append(f"{where}: per_query.csv has no column {column} (columns: {', '.join(table.columns)})")
        return None
    return table[column]


def distribution(values: list[float]) -> str:
    """One cell's values × 100: one number, or mean ± sd [min–max], n=N for several seeds."""
    v = 100 * np.array(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f} [{v.min():.1f}–{v.max():.1f}], n={len(v)}"


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values."""
    items = sorted(pvalues.items(), key=lambda kv: kv[1])
    m, running, out = len(items), 0.0, {}
    for i, (k, p) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def collapse_forums(values: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Replace the 12 cqadupstack-<forum> cells of a row by their mean (only when all 12 are there)."""
    out = {k: v for k, v in values.items() if not k[1].startswith("cqadupstack-")}
    for method in {m for m, d in values if d.startswith("cqadupstack-")}:
        forums = [values.get((method, f"cqadupstack-{f}"), np.nan) for f in CQA_FORUMS]
        out[(method, "cqadupstack")] = float(np.mean(forums)) if not np.isnan(forums).any() else np.nan
    return out


def build_tables(df: pd.DataFrame, measure: str, baseline: str = "first-stage", alpha: float = 0.05,
                 unreadable: list[str] | None = None, store: Store | None = None) -> dict[str, pd.DataFrame]:
    """Per model: rows = first stages then methods, columns = data sets (+ BEIR-15 and avg), values x 100. A cell with
    several configs (seeds) shows their distribution and is tested by its per-query mean over them.

    baseline: "first-stage" tests each method against the first stage whose candidates it re-ranked; any other value
    names a row label to test every method against.
    """
    from scipy.stats import ttest_rel

    parsed = parse_measures([measure])[0]
    col_rr, col_fs = metric_key("rerank", parsed), metric_key("first_stage", parsed)
    tables, cache = {}, {}
    unreadable = unreadable if unreadable is not None else []
    for model, g in df.groupby("model"):
        values: dict[tuple[str, str], list[float]] = {}
        queries: dict[tuple[str, str], pd.Series] = {}
        base_of: dict[str, str] = {}
        for (method, ds), cell in g.groupby(["method", "dataset"], sort=False):
            fs = cell.iloc[0]["first_stage"]
            values[(method, ds)] = [m.get(col_rr, np.nan) for m in cell["metrics"]]
            values.setdefault((fs, ds), [cell.iloc[0]["metrics"].get(col_fs, np.nan)])
            base_of[method] = fs
            if store is None:
                continue
            series = [per_query_or_none(store, row, col_rr, cache, unreadable) for _, row in cell.iterrows()]
            series = [x for x in series if x is not None]
            if series and len(series) == len(cell):
                queries[(method, ds)] = pd.concat(series, axis=1).mean(axis=1)
            first = per_query_or_none(store, cell.iloc[0], col_fs, cache, [])
            if first is not None:
                queries.setdefault((fs, ds), first)
        pvals = {}
        for (method, ds), series in queries.items():
            ref = base_of.get(method) if baseline == "first-stage" else baseline
            base = queries.get((ref, ds))
            if method == ref or base is None or method in base_of.values():
                continue
            a, b = series.align(base, join="inner")
            if len(a) > 1 and not np.allclose(a.values, b.values):
                pvals[(method, ds)] = (float(ttest_rel(a.values, b.values).pvalue), ref)
        adjusted = holm({k: v[0] for k, v in pvals.items()})
        means = collapse_forums({k: float(np.mean(v)) for k, v in values.items()})
        datasets = sorted({d for _, d in means}, key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else 99, d))
        first_stages = sorted(set(base_of.values()), key=lambda s: (s != "BM25", s))
        methods = first_stages + sorted({m for m, _ in means} - set(first_stages))
        beir = [d for d in datasets if d in BEIR_15]
        extra = (["BEIR-15"] if beir else []) + (["avg"] if len(datasets) > 1 else [])
        table = pd.DataFrame(index=methods, columns=datasets + extra, dtype=object)
        for method in methods:
            nums = {}
            for ds in datasets:
                v = means.get((method, ds), np.nan)
                if np.isnan(v):
                    table.loc[method, ds] = ""
                    continue
                nums[ds] = v
                p = adjusted.get((method, ds))
                ref = pvals.get((method, ds), (None, None))[1]
                better = v > means.get((ref, ds), np.nan)
                mark = "" if p is None or p >= alpha else ("†" if better else "‡")
                table.loc[method, ds] = distribution(values.get((method, ds), [v])) + mark
            if "BEIR-15" in extra:
                table.loc[method, "BEIR-15"] = f"{100 * np.mean([nums[d] for d in BEIR_15]):.1f}" if all(d in nums for d in BEIR_15) else ""
            if "avg" in extra:
                table.loc[method, "avg"] = f"{100 * np.mean(list(nums.values())):.1f}" if len(nums) == len(datasets) else ""
        for ref_name, ref in REFERENCE.items():
            if any(d in ref for d in datasets):
                table.loc[ref_name] = [f"{100 * ref[d]:.1f}" if d in ref else "" for d in datasets] + [""] * len(extra)
        table.index.name = "method"
        tables[model] = table
    return tables


def missing_cells(df: pd.DataFrame, expect: list[str] | None = None) -> list[str]:
    """Cells of the intended grid that have no finished run.

    expect: specs "model1,model2:dataset1,dataset2[:first_stage1,first_stage2]" (each model x each data set x every
    method of the experiment on those first stages, e.g. BM25, dense:minilm); without them, every model x every
    (method, data set) pair some model ran.
    """
    have = set(zip(df["model"], df["method"], df["dataset"]))
    pairs = set(zip(df["method"], df["dataset"]))
    grid = []
    if not expect:
        grid = [(m, meth, ds) for m in set(df["model"]) for meth, ds in pairs]
    for spec in expect or []:
        models, datasets, *stages = spec.split(":", 2)
        wanted = set(stages[0].split(",")) if stages else set(df["first_stage"])
        methods = {meth for meth, fs in zip(df["method"], df["first_stage"]) if fs in wanted}
        grid += [(m, meth, ds) for m in models.split(",") for ds in datasets.split(",") for meth in methods]
    return [f"{m} × {meth} × {ds}" for m, meth, ds in sorted(set(grid)) if (m, meth, ds) not in have]


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


def sweep_table(df: pd.DataFrame, key: str, measure: str) -> pd.DataFrame:
    """One row per (model, method, data set, value of `key`): kept layers, the measure, latency and peak memory, the
    last three also relative to the line's first point (the smallest value: no truncation for truncation.fraction).
    Lines are named by the method without the swept setting (`CoRe-k8 τ=0.1 [trunc=fraction]`)."""
    metric = metric_key("rerank", parse_measures([measure])[0])
    group, _, setting = key.partition(".")
    rows = []
    for _, r in df.iterrows():
        if key not in r["params"]:
            continue
        m = r["metrics"]
        rows.append({"model": r["model"], "method": names.method_label(r["key"], group, setting), "dataset": r["dataset"],
                     key: float(r["params"][key]), "kept_layers": m.get("kept_layers"), measure: m.get(metric),
                     "latency_s": m.get("latency_mean_s"), "peak_memory_mb": m.get("peak_memory_mb")})
    if not rows:
        raise CorexpError(f"no finished run of this experiment logs '{key}'")
    t = pd.DataFrame(rows).sort_values(["model", "method", "dataset", key])
    for col in (measure, "latency_s", "peak_memory_mb"):
        first = t.groupby(["model", "method", "dataset"])[col].transform("first")
        t[f"{col} rel."] = t[col] / first
    return t


def sweep_figures(t: pd.DataFrame, key: str, measure: str, out: Path) -> list[Path]:
    """Per model: the measure, latency and peak memory against `key`, a line per method and data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model, g in t.groupby("model"):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for (method, ds), h in g.groupby(["method", "dataset"]):
            for ax, col in zip(axes, (measure, "latency_s", "peak_memory_mb")):
                ax.plot(h[key], h[col], marker="o", label=f"{method} · {ds}")
        for ax, title in zip(axes, (measure, "latency per query (s)", "peak memory (MB)")):
            ax.set_xlabel(key)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{model}: {measure}, latency and memory against {key}", fontsize=10)
        fig.tight_layout()
        path = out / f"{model}_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    return paths


def _notes(df: pd.DataFrame, unreadable: list[str]) -> list[str]:
    """What the reader must know about the runs behind the tables: which code computed them, unusable artifacts."""
    md = [f"\nEvery number comes from a run of the current code ({df.attrs.get('current_code')}) unless listed here.\n"]
    if df.attrs.get("older_code"):
        md += ["\n## Numbers from older code\n", "These configs have no run of the current code; their numbers come from the "
               "code named (its `code_digest` tag):\n", *[f"- {x}" for x in df.attrs["older_code"]], ""]
    if unreadable:
        md += ["\n## Runs without per-query results\n", "No paired test for these runs:\n", *[f"- {x}" for x in unreadable], ""]
    return md


def write_report(uri: str, experiments: list[str], out: Path, measure: str, baseline: str = "first-stage",
                 vs: str | None = None, expect: list[str] | None = None) -> tuple[list[Path], str]:
    """Tables, figures and a Markdown report into the folder `out`; or, when `out` ends in .md, the Markdown there
    and the other files into the folder of the same name beside it (docs/results.md + docs/results/). Returns the
    files written and the Markdown (the CLI prints it)."""
    store = Store(uri)
    df = load_runs(store, experiments)
    check_measure(df, measure)
    out = Path(out)
    md_path, link = (out, f"{out.stem}/") if out.suffix == ".md" else (out / "report.md", "")
    out = out.with_suffix("") if out.suffix == ".md" else out
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if vs:
        t = sweep_table(df, vs, measure)
        written += sweep_figures(t, vs, measure, out)
        md = [f"# {measure}, latency and peak memory against {vs} ({', '.join(experiments)})\n",
              "Relative columns: each value divided by the first point of its line (the smallest "
              f"{vs}, i.e. no truncation for truncation.fraction).\n", t.to_markdown(index=False, floatfmt=".4g"), ""]
        md += [f"![{p.stem}]({link}{p.name})" for p in written] + _notes(df, [])
        t.to_csv(out / "sweep.csv", index=False)
        md_path.write_text("\n".join(md) + "\n")
        return [*written, out / "sweep.csv", md_path], "\n".join(md)
    unreadable: list[str] = []
    tables = build_tables(df, measure, baseline, unreadable=unreadable, store=store)
    base_text = "the first stage whose candidates it re-ranked" if baseline == "first-stage" else baseline
    md = [f"# {measure} by model ({', '.join(experiments)})\n",
          f"† significantly better than {base_text}, ‡ significantly worse (paired t-test over queries, Holm-corrected "
          "per model, p < 0.05). Values × 100. BEIR-15: mean of the 15 BEIR sets (CQADupStack = mean of its 12 forums), "
          "shown when all are present. Reference rows: published numbers (docs/METHOD.md §7).\n"]
    queries = df.groupby(["model", "dataset"])["queries"].max()
    for model, table in sorted(tables.items()):
        counts = ", ".join(f"{ds}: {int(q)}" for (m, ds), q in queries.items() if m == model and q == q)
        md += [f"\n## {model}\n", f"Queries per data set: {counts}.\n", table.to_markdown(), ""]
        table.to_csv(out / f"{model}.csv")
        (out / f"{model}.tex").write_text(table.to_latex(escape=True))
        written += [out / f"{model}.csv", out / f"{model}.tex"]
        fig = head_figure(df, model, out / f"{model}_head_layers.png")
        if fig:
            written.append(fig)
            md.append(f"![{model} head layers]({link}{fig.name})\n")
    missing = missing_cells(df, expect)
    md += ["\n## Missing cells\n", "\n".join(f"- {m}" for m in missing) if missing else "None: every cell of the grid has a run.", ""]
    md += _notes(df, unreadable)
    md_path.write_text("\n".join(md) + "\n")
    written.append(md_path)
    return written, "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.report", description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{project_root()}/mlflow.db")
    ap.add_argument("--experiment", action="append", default=None, help="MLflow experiment (repeatable; default corexp)")
    ap.add_argument("--measure", default="nDCG@10")
    ap.add_argument("--baseline", default="first-stage",
                    help="row label the paired tests compare against (default: each method's own first stage)")
    ap.add_argument("--expect", action="append", default=None, metavar="MODELS:DATASETS[:FIRST_STAGES]",
                    help="the grid to check for missing cells, e.g. smollm2,gemma3:dl19:BM25 (repeatable)")
    ap.add_argument("--vs", default=None, help="a swept numeric setting (truncation.fraction, heads.k): figure + table")
    ap.add_argument("--out", default=None, help="output folder (default <root>/reports/<experiment>), or a .md file "
                    "(its tables and figures go into the folder of the same name beside it)")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's artifact is noise here
    experiments = args.experiment or ["corexp"]
    out = Path(args.out) if args.out else project_root() / "reports" / "_".join(experiments)

    def body() -> None:
        written, markdown = write_report(args.tracking_uri, experiments, out, args.measure, args.baseline, args.vs,
                                         args.expect)
        print(markdown)
        print("\nwritten:", *written, sep="\n  ")

    return cli_main("corexp.report", body)


if __name__ == "__main__":
    sys.exit(main())
