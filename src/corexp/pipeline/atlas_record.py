"""Running a head atlas and logging it as one MLflow run (studies/atlas.py is its command line and report): the atlas
job and the jobs whose detected sets it marks are composed here, at its door; the computation is pipeline/atlas.py
(in the code digest), the figures and logging here are not (an edit of them reruns nothing)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from corexp.config import compose_config
from corexp.errors import CorexpError
from corexp.files import stable_key
from corexp.job import Job
from corexp.locations import project_root
from corexp.pipeline.atlas import MEASURE, Atlas, compute
from corexp.pipeline.run import select_heads
from corexp.tracking.identity import Identity, location_params
from corexp.tracking.tracker import RunRequest


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
    info = base.model.info(base.paths.cache)
    selections = {name: select_heads(job, [], info)[0] for name, job in marked.items()}
    job = replace(base, tracking=replace(base.tracking, experiment=experiment))
    ident = job.identity()
    extra = [] if tuple(marks) == tuple(MARKS) else [list(marks)]  # the marked sets, when not all of them
    key = stable_key(ident.config_hash, "atlas", list(widths), k, *extra)
    identity = Identity(key, ident.code_digest, stable_key(ident.setup_hash, "atlas", list(widths), k, *extra),
                        ident.data_fingerprint)
    tags = {"study": "atlas", "model": job.model.name, "dataset": job.data.name, "widths": ",".join(map(str, widths)),
            "k": str(k), "overrides": " ".join(overrides)}
    params = {**job.run_key().params(), **location_params(job.components())}
    request = RunRequest(identity, f"atlas · {job.model.name} · {job.data.name}", tags, params, job.config_text)
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
