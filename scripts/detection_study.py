"""How much a cheaper detection set changes the chosen heads: Jaccard of the top-k against a reference set, and time.

    python scripts/detection_study.py --model smollm2 --reference detection=sample100 \\
        --variant "40q-m19-w60:detection.num_queries=40,detection.num_negatives=19,detection.max_words=60"

Each variant's detection table is computed (or read from the cache) exactly as a job would; only the eval data set's
name matters here (data=dl19: its queries never overlap the SciFact train sample). Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import time

from corexp.components import heads as H
from corexp.config import compose_config
from corexp.engine.models import model_info
from corexp.job import Job
from corexp.pipeline.run import detection


def table(model: str, overrides: list[str]):
    job = Job.from_config(compose_config([f"model={model}", "data=dl19", "progress=true", *overrides]))
    t0 = time.perf_counter()
    t = detection(job, [], model_info(job.model, job.paths.cache))
    return t, time.perf_counter() - t0, job.model.tau


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--reference", default="detection=sample100", help="comma-separated overrides of the reference set")
    ap.add_argument("--variant", action="append", default=[], help="name:comma-separated overrides (repeatable)")
    a = ap.parse_args()
    ref_t, _, tau = table(a.model, a.reference.split(","))

    def tops(t):  # CoRe and QRHead (long-context variant: the same instances, unshuffled) from one detection table
        return (H.top_k(H.core_scores(t.masses, t.pos_index, tau), a.k),
                H.top_k(H.qrhead_lme_scores(t.scores, t.pos_index), a.k))

    ref = dict(zip(("core", "qrhead"), tops(ref_t)))
    print(json.dumps({"reference": a.reference, "instances": ref_t.instances, "core": H.format_heads(ref["core"])}))
    for spec in a.variant:
        name, _, overrides = spec.partition(":")
        t, secs, _ = table(a.model, [*a.reference.split(","), *overrides.split(",")])
        core, qr = tops(t)
        print(json.dumps({"variant": name, "instances": t.instances, "seconds": round(secs, 1),
                          "core": H.format_heads(core), "jaccard_core": round(H.jaccard(core, ref["core"]), 3),
                          "jaccard_qrhead": round(H.jaccard(qr, ref["qrhead"]), 3)}), flush=True)


if __name__ == "__main__":
    main()
