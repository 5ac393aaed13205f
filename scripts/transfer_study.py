"""The transfer study of docs/transfer.md: where the heads come from. CoRe-k8, QRHead-k8 (both official drivers) and
window-w4 detected in-domain on DL19 by 5-fold cross-validation (`detection=crossval`: each query scored with heads
detected on the other folds' re-ranking prompts), against the same selectors detected on SciFact train (fold 0) and
ICR / random heads, whose runs come from `scripts/scaling_study.py --phases main` (experiment `scaling`); the oracle
top-8 (an upper bound, chosen on the evaluation queries) from the head atlas (experiment `atlas`).

    python scripts/transfer_study.py --data-dir ../shared/data [--models smollm2,gemma3,qwen25coder,qwen25coder15]
    python -m corexp.studies.transfer --out docs/transfer.md --readme

Every cell is an ordinary corexp job (experiment `transfer`); with the read-out cache of the scaling study's ICR run
(one forward per DL19 query, every head) each one takes seconds: detection and re-ranking read the same tables.
Resumable: a finished cell is skipped.
"""

from __future__ import annotations

import argparse
import sys

from _sweeps import run_all

MODELS = ["smollm2", "gemma3", "qwen25coder", "qwen25coder15"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding the BEIR-layout dl19/ folder")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--experiment", default="transfer")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    cmds = [[sys.executable, "-m", "corexp", "-m", f"model={model}", "data=dl19", f"data.local_dir={args.data_dir}/dl19",
             "detection=crossval", "heads.k=8", "readout_cache=true", "progress=false",
             f"tracking.experiment={args.experiment}", *sweep]
            for model in args.models.split(",") for sweep in (["heads=core,window"], ["heads=qrhead", "heads.variant=beir,lme"])]
    return 1 if run_all(cmds, args.dry_run) else 0


if __name__ == "__main__":
    sys.exit(main())
