"""Build the embedded SciFact sample shipped in src/corexp/resources/scifact_sample (reproducible, seeded).

    python scripts/build_embedded_sample.py ../shared/data/scifact

Test: 50 test queries (seeded sample) with the top-20 of the shipped Anserini BM25 run.
Train (head detection): 100 train queries (seeded sample among those with a judged document) with the top-25 of
BM25 computed here with bm25s over the full corpus, plus their judged documents. Corpus: every document used.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

from corexp.components.first_stage import BM25Params, bm25_run
from corexp.data.datasets import load_local, read_beir_qrels, read_trec_run, write_trec_run

N_TEST, TEST_DEPTH, N_TRAIN, TRAIN_DEPTH, SEED = 50, 20, 100, 25, 0

LICENSE = """SciFact sample (a subset of BEIR SciFact, built by scripts/build_embedded_sample.py).

Source: SciFact (Wadden et al., 2020, https://github.com/allenai/scifact) in the BEIR layout (Thakur et al., 2021).
Abstracts: from the Semantic Scholar S2ORC corpus, Open Data Commons Attribution License (ODC-By 1.0).
Claims and annotations (queries, qrels): Creative Commons Attribution 4.0 (CC BY 4.0).
Test run: Anserini 1.7.1 BM25 flat (k1=0.9, b=0.4) top-20. Train run: bm25s BM25 (k1=0.9, b=0.4, Lucene
variant, Snowball English stemmer, English stopwords) top-25 over the complete corpus.
"""


def main(src: str, out: str = "src/corexp/resources/scifact_sample") -> None:
    src_dir, out_dir = Path(src), Path(out)
    rng = random.Random(SEED)
    test = load_local(src_dir, "test", "scifact")
    train_qrels = read_beir_qrels(src_dir / "qrels" / "train.tsv")
    with open(src_dir / "queries.jsonl") as fh:
        all_queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in fh}
    corpus_ids = {d.id for d in test.docs.iter_docs()}
    test_ids = sorted(rng.sample(sorted(test.queries), N_TEST), key=int)
    train_pool = sorted(q for q, rels in train_qrels.items() if any(d in corpus_ids for d, r in rels.items() if r > 0))
    train_ids = sorted(rng.sample(train_pool, N_TRAIN), key=int)
    anserini = read_trec_run(src_dir / "run.bm25.trec")
    run = {q: anserini[q][:TEST_DEPTH] for q in test_ids}
    train_ds = load_local(src_dir, "train", "scifact-train") if (src_dir / "qrels" / "train.tsv").is_file() else None
    bm25 = bm25_run(train_ds, train_ids, BM25Params(), hits=TRAIN_DEPTH, show_progress=False)
    run.update(bm25)
    used = {d for ranked in run.values() for d, _ in ranked}
    used |= {d for q in test_ids for d in test.qrels[q]} | {d for q in train_ids for d in train_qrels[q]}
    used &= corpus_ids
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "qrels").mkdir(exist_ok=True)
    with gzip.GzipFile(out_dir / "corpus.jsonl.gz", "wb", mtime=0) as gz:
        for d in test.docs.iter_docs():
            if d.id in used:
                gz.write((json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n").encode())
    with open(out_dir / "queries.jsonl", "w") as fh:
        for q in test_ids + train_ids:
            fh.write(json.dumps({"_id": q, "text": all_queries[q]}) + "\n")
    for split, ids, qrels in (("test", test_ids, test.qrels), ("train", train_ids, train_qrels)):
        with open(out_dir / "qrels" / f"{split}.tsv", "w") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for q in ids:
                for d, r in sorted(qrels[q].items()):
                    fh.write(f"{q}\t{d}\t{r}\n")
    write_trec_run(run, out_dir / "run.bm25.trec", "sample")
    (out_dir / "LICENSE.txt").write_text(LICENSE)
    print(f"{len(test_ids)} test + {len(train_ids)} train queries, {len(used)} documents -> {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:])
