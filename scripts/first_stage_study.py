"""First stages on a full BEIR test set: nDCG@10 and recall of BM25, dense and hybrid, and the corpus embedding time.

    python scripts/first_stage_study.py --local-dir ../shared/data/scifact --name scifact

Each first stage is computed exactly as a job computes it (same configs, same caches); `--cold-embeddings` embeds the
corpus into an empty cache folder first and reports the time and rate (the dense encoder itself comes from the normal
cache). Prints one JSON line per first stage.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from corexp.components import dense
from corexp.config import compose_config
from corexp.data.datasets import load_local, select_queries
from corexp.data.evaluation import evaluate, parse_measures
from corexp.job import Job

STAGES = {"bm25s": ["first_stage=bm25"], "dataset-run": ["first_stage=auto"], "dense": ["first_stage=dense"],
          "hybrid": ["first_stage=hybrid"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local-dir", required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    ap.add_argument("--name", default="scifact")
    ap.add_argument("--split", default="test")
    ap.add_argument("--encoder", default="minilm", help="first_stage/encoder config")
    ap.add_argument("--measures", default="nDCG@10,R@20,R@40,R@100")
    ap.add_argument("--cold-embeddings", action="store_true", help="time the corpus embedding from an empty cache")
    a = ap.parse_args()
    ds = load_local(a.local_dir, a.split, a.name)
    qids = select_queries(ds, None)
    measures = parse_measures(a.measures.split(","))
    base = Job.from_config(compose_config(["first_stage=dense", f"first_stage/encoder={a.encoder}"]))
    cache = base.paths.cache
    if a.cold_embeddings:
        enc = dense.load_encoder(base.first_stage.encoder, cache)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            emb, ids = dense.corpus_embeddings(enc, ds, Path(tmp), progress=True)
            secs = time.perf_counter() - t0
        print(json.dumps({"embed_documents": len(ids), "seconds": round(secs, 1), "docs_per_s": round(len(ids) / secs, 1),
                          "torch_threads": torch.get_num_threads(), "dim": int(emb.shape[1]), "dtype": str(emb.dtype)}),
              flush=True)
    for name, overrides in STAGES.items():
        encoder = [f"first_stage/encoder={a.encoder}"] if name in ("dense", "hybrid") else []
        stage = Job.from_config(compose_config([*overrides, *encoder])).first_stage
        t0 = time.perf_counter()
        run, label = stage.retrieve(ds, qids, cache, True)
        secs = time.perf_counter() - t0
        means, _ = evaluate(ds.qrels, run, measures)
        print(json.dumps({"first_stage": label, "queries": len(qids), "seconds": round(secs, 1),
                          **{k: round(v, 4) for k, v in means.items()}}), flush=True)


if __name__ == "__main__":
    main()
