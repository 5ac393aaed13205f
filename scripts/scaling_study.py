"""The heads study of docs/scaling.md and docs/atlas.md: four model sizes x methods x document orders on DL19, the
N/A-calibration ablation, layer windows, head-set stability and the head atlas.

    python scripts/scaling_study.py --data-dir ../shared/data [--models smollm2,gemma3,qwen25coder,qwen25coder15]
        [--phases main,calibration,reversed,shuffled,stability,atlas] [--dry-run]
    python -m corexp.studies.scaling --experiment scaling --out docs/scaling.md --readme
    python -m corexp.studies.atlas --report --experiment atlas --out docs/atlas.md

Every cell is an ordinary corexp job (one MLflow run, experiment `scaling`), run one sweep at a time (the CPU is the
scarce resource: two jobs at once only slow each other). `readout_cache=true`: the first job of each (model, document
order) reads every head in its forward and keeps the per-prompt table, so ICR, QRHead-k8 (both official detection
variants), QR-R-k8, CoRe-k8, five random-k8 draws, the layer window, RRF fusion and the uncalibrated variants of the
same prompts cost one forward per query, and the atlas none. Heads and windows come from `detection=scifact_train`
(40 queries of the complete SciFact train split, disjoint from DL19): fold 0 for the main rows, folds 1 and 2 for the
stability study. One detection forward per instance serves CoRe, QR-R, QRHead's long-context variant and the window;
QRHead's BEIR variant reads its shuffled instances in a forward of their own. Resumable: a finished cell is skipped
(its identity, by content, is already FINISHED), a killed one recomputed.
"""

from __future__ import annotations

import argparse
import sys

from _sweeps import run_all

MODELS = ["smollm2", "gemma3", "qwen25coder", "qwen25coder15"]
SEEDS = "0,1,2,3,4"
PHASES = "main,calibration,reversed,shuffled,stability,atlas"


def sweeps(phase: str) -> list[list[str]]:
    """The sweeps of one phase; in each order the all-heads job (ICR) runs first and fills the read-out cache."""
    if phase == "main":
        return [["heads=all"], ["heads=core,qr_r"], ["heads=qrhead", "heads.variant=beir,lme"],
                ["heads=random", f"heads.seed={SEEDS}"], ["heads=window"], ["heads=core", "fusion=rrf"]]
    if phase == "calibration":
        return [["heads=all,core,qrhead", "scoring.calibration=false"]]
    if phase in ("reversed", "shuffled"):
        order = ["prompt.doc_order=reversed"] if phase == "reversed" else ["prompt=shuffled"]
        return [[*order, "heads=all"], [*order, "heads=core,qrhead"], [*order, "heads=random", f"heads.seed={SEEDS}"]]
    if phase == "stability":
        return [["heads=core,qrhead", "detection.fold=1,2"]]
    raise SystemExit(f"unknown phase {phase}; phases: {PHASES}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding the BEIR-layout dl19/ and scifact/ folders")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--phases", default=PHASES)
    ap.add_argument("--experiment", default="scaling")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    common = ["data=dl19", f"data.local_dir={args.data_dir}/dl19", "detection=scifact_train",
              f"detection.local_dir={args.data_dir}/scifact", "detection.fold=0", "heads.k=8", "readout_cache=true",
              "progress=false"]
    failed = 0
    for model in args.models.split(","):
        for phase in args.phases.split(","):
            if phase == "atlas":
                cmds = [[sys.executable, "-m", "corexp.studies.atlas", f"model={model}", *common[:5]]]
            else:
                cmds = []
                for sweep in sweeps(phase):
                    args_ = dict(a.split("=", 1) for a in [f"model={model}", *common, f"tracking.experiment={args.experiment}",
                                                           *sweep])  # later ones win
                    cmds.append([sys.executable, "-m", "corexp", "-m", *[f"{k}={v}" for k, v in args_.items()]])
            failed += run_all(cmds, args.dry_run)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
