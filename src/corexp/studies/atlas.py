"""The head atlas: for one model and data set, how well every single head, every layer and every window of consecutive
layers re-ranks — and where the detected CoRe and QRHead heads sit among them.

    python -m corexp.studies.atlas model=qwen25coder15 data=dl19 data.local_dir=<dl19> detection=scifact_train \\
        detection.local_dir=<scifact> [--widths 1 2 3 4] [--k 8] [--experiment atlas]
    python -m corexp.studies.atlas --report --experiment atlas --out docs/atlas.md

Everything comes from the read-out cache (`readout_cache`): one table per prompt holds every head's token scores for the
real and the N/A query, so any head set is scored as a job scores it (c_j summed over the set, then the mean-2σ mask,
METHOD.md §3) without a forward; a prompt without a table is read out once. Each atlas is one MLflow run (CSV tables,
a layer × head heatmap with the detected heads marked, a per-layer curve). The "oracle top-k" — the k best single heads
on the evaluation queries themselves — is an upper bound, labelled so and never a method: it is chosen on the queries
it is scored on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from corexp.config import compose_config
from corexp.errors import CorexpError, cli_main
from corexp.files import stable_key
from corexp.job import Job
from corexp.locations import project_root
from corexp.pipeline.atlas import MEASURE, Atlas, compute
from corexp.pipeline.run import select_heads
from corexp.tracking.identity import Identity
from corexp.tracking.tracker import RunRequest, Store


# -- figures --------------------------------------------------------------------------------------------------------
def heatmap(atlas: Atlas, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((atlas.n_layers, atlas.n_heads), np.nan)
    for _, r in atlas.heads.iterrows():
        grid[int(r["layer"]), int(r["head"])] = 100 * r[MEASURE]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * atlas.n_heads + 2.5), max(4, 0.22 * atlas.n_layers + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    fig.colorbar(im, ax=ax, label=f"{MEASURE} × 100 of the single head")
    for name, style in (("CoRe-k8", {"marker": "o", "s": 70, "facecolors": "none", "edgecolors": "red"}),
                        ("QRHead-k8", {"marker": "x", "s": 45, "c": "white"}),
                        ("QR-R-k8", {"marker": "+", "s": 45, "c": "orange"})):
        hs = atlas.detected.get(name, [])
        if hs:
            ax.scatter([h for _, h in hs], [l for l, _ in hs], linewidths=1.8, label=name, **style)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{atlas.model} on {atlas.dataset}: every head alone ({atlas.queries} queries)", fontsize=9)
    if atlas.detected:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def layer_curve(atlas: Atlas, path: Path, first_stage: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(atlas.layers["layer"], 100 * atlas.layers[MEASURE], "o-", label="one layer (all its heads)")
    for w, g in atlas.windows[atlas.windows["width"] > 1].groupby("width"):
        ax.plot(g["start"] + (w - 1) / 2, 100 * g[MEASURE], "-", alpha=0.8, label=f"window of {w} layers (at its centre)")
    icr = atlas.sets.loc[atlas.sets["head set"].str.startswith("ICR"), MEASURE]
    if len(icr):
        ax.axhline(100 * float(icr.iloc[0]), color="black", lw=1, ls="--", label="ICR (all layers)")
    if first_stage is not None:
        ax.axhline(100 * first_stage, color="gray", lw=1, ls=":", label="first stage (BM25)")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{MEASURE} × 100")
    ax.set_title(f"{atlas.model} on {atlas.dataset}: layers and windows of layers", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


# -- running and logging ----------------------------------------------------------------------------------------------
MARKS = {"CoRe-k8": ["heads=core", "heads.k=8"], "QRHead-k8": ["heads=qrhead", "heads.k=8"],
         "QR-R-k8": ["heads=qr_r", "heads.k=8"], "window-w4": ["heads=window", "heads.width=4"]}


def jobs(overrides: list[str], marks: tuple[str, ...] = tuple(MARKS)) -> tuple[Job, dict[str, Job]]:
    """The atlas job (every head, read-out cache on) and the jobs whose head selections it marks."""
    unknown = [m for m in marks if m not in MARKS]
    if unknown:
        raise CorexpError(f"--mark {unknown[0]} is not a detected set: use {', '.join(MARKS)}")
    base = Job.from_config(compose_config([*overrides, "heads=all", "readout_cache=true"]))
    return base, {name: Job.from_config(compose_config([*overrides, *MARKS[name], "readout_cache=true"])) for name in marks}


def run(overrides: list[str], widths: tuple[int, ...], k: int, experiment: str, marks: tuple[str, ...] = tuple(MARKS)) -> str:
    """Compute one atlas and log it as an MLflow run (skipped when the same atlas of the same code is there)."""
    base, marked = jobs(overrides, marks)
    info = base.model.info(base.cache)
    selections = {name: select_heads(job, [], info)[0] for name, job in marked.items()}
    job = replace(base, tracking=replace(base.tracking, experiment=experiment))
    ident = job.identity()
    extra = [] if tuple(marks) == tuple(MARKS) else [list(marks)]  # the marked sets, when not all of them
    key = stable_key(ident.config_hash, "atlas", list(widths), k, *extra)
    identity = Identity(key, ident.code_digest, stable_key(ident.setup_hash, "atlas", list(widths), k, *extra),
                        ident.data_fingerprint)
    tags = {"study": "atlas", "model": job.model.name, "dataset": job.data.name, "widths": ",".join(map(str, widths)),
            "k": str(k), "overrides": " ".join(overrides)}
    request = RunRequest(identity, f"atlas · {job.model.name} · {job.data.name}", tags, job.params(), job.config_text)
    tracker = job.tracking.open()
    claim = tracker.claim(request, force=job.options.force)
    if claim.finished is not None:
        print(f"corexp.atlas: skipped — the same atlas and code already FINISHED: {claim.finished.name}")
        return claim.finished.run_id
    out = Path(project_root()) / "outputs" / "atlas" / f"{job.model.name}-{job.data.name}-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    with claim.run.running() as active:
        atlas = compute(job, widths, k, selections)
        atlas.heads.to_csv(out / "heads.csv", index=False)
        atlas.layers.to_csv(out / "layers.csv", index=False)
        atlas.windows.to_csv(out / "windows.csv", index=False)
        atlas.sets.to_csv(out / "sets.csv", index=False)
        meta = {"model": atlas.model, "dataset": atlas.dataset, "layers": atlas.n_layers, "heads": atlas.n_heads,
                "queries": atlas.queries, "detected": {n: [list(h) for h in hs] for n, hs in atlas.detected.items()},
                "window_chosen": {n: list(s.window) for n, s in selections.items() if s.window}}
        (out / "atlas.json").write_text(json.dumps(meta, indent=1))
        figures = [heatmap(atlas, out / "heatmap.png"), layer_curve(atlas, out / "layers.png")]
        active.log_artifacts([out / f for f in ("heads.csv", "layers.csv", "windows.csv", "sets.csv", "atlas.json")] + figures)
        best = atlas.heads[MEASURE].max()
        active.log_metrics({"queries": float(atlas.queries), "best_head.nDCG_at_10": float(best),
                            "icr.nDCG_at_10": float(atlas.sets.iloc[0][MEASURE])})
    print(atlas.sets.to_string(index=False))
    return active.run_id


# -- the report (docs/atlas.md) ---------------------------------------------------------------------------------------
MODEL_ORDER = ("smollm2", "gemma3", "qwen25coder", "qwen25coder15")


def report(uri: str, experiment: str, out: Path) -> str:
    """docs/atlas.md from the newest atlas run per model (the current code's where there is one)."""
    import shutil

    from corexp.tracking.identity import code_digest

    store = Store(uri)
    runs = [r for r in store.finished_runs([experiment]) if r.tags.get("study") == "atlas"]
    if not runs:
        raise CorexpError(f"no FINISHED atlas run in experiment {experiment} of {uri}")
    current = code_digest()
    chosen: dict[tuple[str, str], Any] = {}
    for r in sorted(runs, key=lambda r: (r.code_digest == current, r.start_ms)):
        chosen[(r.tags["model"], r.tags["dataset"])] = r
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    md = [f"# Head atlas ({experiment})\n",
          "For each model on each data set: the nDCG@10 of every single head used alone, of every layer (all its heads), "
          "and of every window of consecutive layers, all scored from the read-out cache exactly as a job scores a head "
          "set (calibrated token scores summed over the set, mean − 2σ mask, METHOD.md §3). The detected sets (CoRe-k8, "
          "QRHead-k8 — QRHead's BEIR detection: calibrated, per-head masked scores, nDCG@10 of each head's rankings — "
          "and QR-R-k8, the uncalibrated mass on the positive, on 40 SciFact train queries, fold 0) and the window "
          "chosen on the same detection set (heads=window, "
          "w=4) are marked; each detected head's rank among all heads is listed. **The oracle top-k is an upper bound, "
          "not a method**: it takes the k best single heads on the evaluation queries themselves. Generated by "
          "`python -m corexp.studies.atlas --report` from the runs of `scripts/scaling_study.py --phases atlas`.\n"]
    key_order = sorted(chosen, key=lambda mk: (MODEL_ORDER.index(mk[0]) if mk[0] in MODEL_ORDER else 99, mk))
    for model, dataset in key_order:
        r = chosen[(model, dataset)]
        meta = json.loads(store.artifact(r.run_id, "atlas.json").read_text())
        heads = pd.read_csv(store.artifact(r.run_id, "heads.csv"))
        windows = pd.read_csv(store.artifact(r.run_id, "windows.csv"))
        layers = pd.read_csv(store.artifact(r.run_id, "layers.csv"))
        sets = pd.read_csv(store.artifact(r.run_id, "sets.csv"))
        for name in ("heatmap.png", "layers.png"):
            shutil.copy(store.artifact(r.run_id, name), folder / f"{model}_{dataset}_{name}")
        code = "" if r.code_digest == current else f" (code {r.code_digest}, not the current {current})"
        n_heads_total = len(heads)
        md += [f"\n## {model} on {dataset} ({meta['layers']} layers × {meta['heads']} heads, {meta['queries']} queries){code}\n",
               f"![{model} heads]({folder.name}/{model}_{dataset}_heatmap.png)\n",
               f"![{model} layers]({folder.name}/{model}_{dataset}_layers.png)\n"]
        tab = sets.copy()
        tab[f"{MEASURE} × 100"] = (100 * tab[MEASURE]).map(lambda v: f"{v:.1f}")
        md += ["Head sets:\n", tab[["head set", f"{MEASURE} × 100", "note"]].to_markdown(index=False), ""]
        rank_rows = []
        for name, hs in meta["detected"].items():
            if name.startswith("window"):
                continue
            ranks = [int(heads[(heads["layer"] == l) & (heads["head"] == h)]["rank"].iloc[0]) for l, h in hs]
            rank_rows.append({"detected set": name, "heads (rank among all heads)": ", ".join(
                f"{l}-{h} ({rk})" for (l, h), rk in zip(hs, ranks)), "median rank": int(np.median(ranks)),
                f"in the best {max(1, n_heads_total // 10)} (top 10 %)": sum(rk <= max(1, n_heads_total // 10) for rk in ranks)})
        if rank_rows:
            md += [f"Where the detected heads rank among all {n_heads_total} single heads (1 = best on these queries):\n",
                   pd.DataFrame(rank_rows).to_markdown(index=False), ""]
        best_layer = layers.sort_values(MEASURE, ascending=False).iloc[0]
        wrows = []
        for w, g in windows.groupby("width"):
            b = g.sort_values([MEASURE, "start"], ascending=[False, True]).iloc[0]
            wrows.append({"width": int(w), "best window (on these queries)": f"[{int(b.start)}, {int(b.end)})",
                          f"{MEASURE} × 100": f"{100 * b[MEASURE]:.1f}", "worst": f"{100 * g[MEASURE].min():.1f}"})
        chosen_w = meta.get("window_chosen", {})
        md += [f"Best single head: {heads.sort_values(MEASURE, ascending=False).iloc[0][['layer', 'head']].astype(int).tolist()} "
               f"({100 * heads[MEASURE].max():.1f}); best layer: {int(best_layer.layer)} ({100 * best_layer[MEASURE]:.1f}). "
               "Windows (the best of each width is chosen on the evaluation queries, so it is an upper bound too; the "
               f"detection set chose {', '.join(f'{n}: [{a}, {b})' for n, (a, b) in chosen_w.items()) or 'none'}):\n",
               pd.DataFrame(wrows).to_markdown(index=False), ""]
    absent = [m for m in MODEL_ORDER if m not in {model for model, _ in chosen}]
    if absent:
        md += ["\n## Not computed\n", f"No atlas run of {', '.join(absent)} in this store (listed, never estimated).", ""]
    text = "\n".join(md) + "\n"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.studies.atlas", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="corexp overrides of the job (model=..., data=..., detection=...)")
    ap.add_argument("--widths", type=int, nargs="*", default=[1, 2, 3, 4], help="window widths in layers")
    ap.add_argument("--k", type=int, default=8, help="heads of the oracle top-k (an upper bound)")
    ap.add_argument("--mark", default=",".join(MARKS),
                    help="the detected sets to mark, comma-separated, or none (each needs its detection table; default: all)")
    ap.add_argument("--experiment", default="atlas")
    ap.add_argument("--report", action="store_true", help="write the Markdown report of the experiment's atlas runs")
    ap.add_argument("--tracking-uri", default=None,
                    help="the store the atlas is logged to and read from (default: tracking.uri of the overrides, "
                         "the project's mlflow.db)")
    ap.add_argument("--out", default=str(project_root() / "docs" / "atlas.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def body() -> None:
        if args.report:
            print(report(args.tracking_uri or f"sqlite:///{project_root()}/mlflow.db", args.experiment, Path(args.out)))
        else:  # the same store for building and for --report
            uri = [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []
            marks = () if args.mark == "none" else tuple(m for m in args.mark.split(",") if m)
            run([*args.overrides, *uri], tuple(args.widths), args.k, args.experiment, marks)

    return cli_main("corexp.atlas", body)


if __name__ == "__main__":
    sys.exit(main())
