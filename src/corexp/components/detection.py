"""Head detection (METHOD.md §4): the `detection` group's component, its instances and, per head and document, the raw
attention mass (CoRe, QR-R) and the calibrated, masked score (QRHead) from one forward per instance with the real and
the N/A query; cached atomically as .npz (no pickle) by content: the model's identity and every instance's prompt."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from corexp.components.heads import DetectionTable
from corexp.data.datasets import IRDataset, Source, TrecRun
from corexp.engine.prompt import PromptBuilder
from corexp.engine.readout_cache import HeadTable
from corexp.engine.reranker import instance_table
from corexp.engine.scoring import head_document_scores
from corexp.errors import CorexpError
from corexp.files import atomic_write_bytes, cached, stable_key
from corexp.settings import setting

log = logging.getLogger(__name__)
CODE_VERSION = "det-v3"  # v3: raw masses and calibrated, masked per-head scores from one forward (real + N/A query)


@dataclass(frozen=True)
class Detection(Source):
    """The `detection` group: the detection set (disjoint from the evaluation queries) and how instances are built."""

    split: str = setting("train", doc="qrels/<split>.tsv of local_dir")
    instances: str = setting("sampled", choices=("sampled", "judged"),
                             doc="sampled: (query, positive, hard negatives) prompts of their own (the papers' detection); "
                                 "judged: the re-ranking prompts of judged queries, read from the read-out cache")
    folds: int | None = setting(None, ge=2, null="no cross-validation",
                                doc="judged only: k-fold cross-validation on the evaluation queries themselves (each "
                                    "query scored with heads detected on the other folds; detection=crossval)")
    num_queries: int | None = setting(40, ge=1, null="every judged query (instances=judged)",
                                      doc="detection queries (each gives `positions` instances)")
    num_negatives: int = setting(19, ge=1, doc="sampled: hard negatives per instance, from the job's first stage")
    positions: int = setting(1, ge=1, doc="sampled: positions of the positive per query (at most num_negatives + 1)")
    max_words: int | None = setting(60, ge=1, null="prompt.max_words", doc="sampled: words per detection document")
    seed: int = setting(0, ge=0, doc="sampling of queries, positives and positions; the folds' assignment")
    fold: int | None = setting(None, ge=0, null="num_queries sampled, no folds",
                               doc="sampled: the i-th of disjoint blocks of num_queries queries (stability studies)")

    @property
    def judged(self) -> bool:
        """Detection reads the evaluation-style prompts of judged queries (components/judged.py)."""
        return self.instances == "judged"

    def check(self) -> None:
        if self.positions > self.num_negatives + 1:
            raise CorexpError(f"detection.positions={self.positions} is not allowed: use 1..{self.num_negatives + 1} "
                              "(detection.num_negatives + 1 slots)")
        if self.folds is not None and not self.judged:
            raise CorexpError("detection.folds needs detection.instances=judged (detection=crossval sets both)")
        if self.num_queries is None and not self.judged:
            raise CorexpError("detection.num_queries=null is not allowed with detection.instances=sampled: use an integer >= 1")

    def table(self, prompt: PromptBuilder, first_stage: Any, eval_query_ids: set[str], cache_dir: Path, model_key: str,
              reranker: Callable[[], Any], progress: bool = True, shuffle: int | None = None) -> DetectionTable:
        return detection_table(self, prompt, first_stage, eval_query_ids, cache_dir, model_key, reranker, progress, shuffle)


def build_instances(ds: IRDataset, run: TrecRun, det: Detection) -> list[dict[str, Any]]:
    """(query, positive, M hard negatives) with the positive placed at P positions; never a judged-relevant negative."""
    rng = random.Random(det.seed)
    m = int(det.num_negatives)
    eligible = []
    for qid in sorted(ds.queries):
        rels = ds.qrels.get(qid, {})
        positives = sorted(d for d, r in rels.items() if r > 0)
        negatives = [d for d, _ in run.get(qid, []) if rels.get(d, 0) <= 0][:m]
        if positives and len(negatives) == m:
            eligible.append((qid, positives, negatives))
    if not eligible:
        raise CorexpError(f"no detection query of {ds.name} has a judged positive and {m} unjudged candidates; "
                          "lower detection.num_negatives")
    fold = det.fold
    if fold is None:
        chosen = rng.sample(eligible, min(int(det.num_queries), len(eligible)))
    else:  # disjoint sets: block `fold` of the eligible queries in the seeded order of fold_pool()
        n = int(det.num_queries)
        order = {q: i for i, q in enumerate(fold_order(ds, det))}
        eligible.sort(key=lambda x: order[x[0]])
        chosen = eligible[int(fold) * n:(int(fold) + 1) * n]
        if len(chosen) < n:
            raise CorexpError(f"detection.fold={fold}: {ds.name} has {len(eligible)} eligible detection queries, "
                              f"too few for fold {fold} of {n}; lower detection.fold or detection.num_queries")
    chosen.sort(key=lambda x: x[0])
    p = int(det.positions)
    instances = []
    for qid, positives, negatives in chosen:
        pos_doc = rng.choice(positives)
        slots = [rng.randrange(m + 1)] if p == 1 else sorted({round(i * m / (p - 1)) for i in range(p)})
        for slot in slots:
            docs = [*negatives[:slot], pos_doc, *negatives[slot:]]
            instances.append({"query_id": qid, "docs": docs, "pos_index": slot})
    return instances


def shuffle_documents(instances: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Each instance's documents shuffled, as QRHead's BEIR driver does: one generator seeded once, one shuffle per
    instance in order (`random.seed(42)`, then `random.shuffle(paragraphs)`); the positive's index follows it."""
    rng = random.Random(seed)
    out = []
    for inst in instances:
        order = list(range(len(inst["docs"])))
        rng.shuffle(order)
        out.append({**inst, "docs": [inst["docs"][i] for i in order], "pos_index": order.index(inst["pos_index"])})
    return out


def instance_arrays(table: HeadTable, spans: list[tuple[int, int]], n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(layers, heads, docs) raw attention masses a_{l,h}(d) (CoRe, QR-R: the real query alone) and calibrated, masked
    scores of each head alone (QRHead: METHOD.md §3 per head) of one prompt's head table."""
    csum = torch.nn.functional.pad(table.real.double().cumsum(dim=1), (1, 0))
    masses = torch.stack([csum[:, b] - csum[:, a] for a, b in spans], dim=1)
    scores = head_document_scores(table.calibrated, spans)
    out_m = np.zeros((n_layers, n_heads, len(spans)), dtype=np.float32)
    out_s = np.zeros((n_layers, n_heads, len(spans)), dtype=np.float32)
    for row, (layer, head) in enumerate(table.labels):
        out_m[layer, head] = masses[row].numpy()
        out_s[layer, head] = scores[row].numpy()
    return out_m, out_s


def read_instance(rr: Any, query: str, docs: list[Any], n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """One instance's raw masses and calibrated, masked per-head scores, from one forward (real + N/A query)."""
    table, enc = instance_table(rr, query, docs)
    return instance_arrays(table, enc.doc_spans, n_layers, n_heads)


def fold_order(ds: IRDataset, det: Detection) -> list[str]:
    """The judged queries in one seeded order; detection.fold=i takes the i-th block of eligible queries in it."""
    judged = ds.judged_queries()
    random.Random(f"fold-order:{det.seed}").shuffle(judged)
    return judged


def instances_digest(prompt: PromptBuilder, ds: IRDataset, instances: list[dict[str, Any]]) -> str:
    """Identity of a detection table by content: every instance's prompt text, positive slot and span convention.

    Neither paths nor config spellings enter it, so a moved checkout or a cluster node hits the same cache, while any
    change of data, first stage, prompt or sampling that changes what the model reads gives a new table. (The span
    rule enters only when it is not the default `offsets`, so tables computed before it existed stay valid.)
    """
    h = hashlib.sha256(json.dumps(prompt.spec.detection_key(), sort_keys=True).encode())
    for inst in instances:
        docs = ds.docs.get_many(inst["docs"])
        text = prompt.text(prompt.doc_texts([docs[d] for d in inst["docs"]]), ds.queries[inst["query_id"]])
        h.update(f"{len(text)}:{inst['pos_index']}:".encode())
        h.update(text.encode())
    return h.hexdigest()


def detection_table(det: Detection, prompt: PromptBuilder, first_stage: Any, eval_query_ids: set[str], cache_dir: Path,
                    model_key: str, reranker: Callable[[], Any], progress: bool = True,
                    shuffle: int | None = None) -> DetectionTable:
    """Raw masses and calibrated, masked per-head scores (instances, layers, heads, docs) and positive indices
    (METHOD.md §4), from one forward per instance (real and N/A query), computed once per model and instance content.
    `shuffle`: the seed of QRHead's BEIR-driver shuffle of each instance's documents (None: as built). `prompt` (a
    PromptBuilder: tokenizer only) keys the cache; `reranker()` loads the model only on a miss."""
    ds = det.load()
    overlap = sorted(set(ds.queries) & set(eval_query_ids))
    if overlap:
        raise CorexpError(
            f"detection queries overlap the evaluation queries ({len(overlap)}, e.g. '{overlap[0]}'); "
            "use a different detection split (detection.split / detection.irds_id)"
        )
    if det.fold is None:  # large training splits (NQ train: 132k queries): a seeded pool of judged queries
        judged = ds.judged_queries()
        pool = sorted(random.Random(det.seed).sample(judged, min(len(judged), 3 * int(det.num_queries))))
    else:  # the first queries of one seeded order, enough for folds 0..fold: the folds never share a query
        pool = sorted(fold_order(ds, det)[:3 * int(det.num_queries) * (int(det.fold) + 1)])
    run, _ = first_stage.retrieve(ds, pool, cache_dir, progress=False)
    instances = build_instances(ds, run, det)
    if shuffle is not None:
        instances = shuffle_documents(instances, shuffle)
    key = stable_key(CODE_VERSION, model_key, instances_digest(prompt, ds, instances))
    path = Path(cache_dir) / "detection" / f"{det.name}-{key}.npz"

    def compute() -> None:
        log.info("head detection: %d instances (%d documents each) -> %s", len(instances), int(det.num_negatives) + 1, path)
        rr = reranker()
        lm = rr.lm
        shape = (len(instances), lm.kept_layers, lm.num_heads, int(det.num_negatives) + 1)
        masses, scores = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
        for i, inst in enumerate(tqdm(instances, desc="head detection", disable=not progress)):
            docs = ds.docs.get_many(inst["docs"])
            masses[i], scores[i] = read_instance(rr, ds.queries[inst["query_id"]], [docs[d] for d in inst["docs"]],
                                                 lm.kept_layers, lm.num_heads)
        pos_index = np.array([inst["pos_index"] for inst in instances], dtype=np.int64)
        doc_ids = np.array([inst["docs"] for inst in instances], dtype=str)
        buf = io.BytesIO()
        np.savez_compressed(buf, masses=masses, scores=scores, pos_index=pos_index, doc_ids=doc_ids)
        atomic_write_bytes(path, buf.getvalue())

    cached(path, compute)  # concurrent jobs: one computes, the others wait for its file
    with np.load(path, allow_pickle=False) as z:
        return DetectionTable(z["masses"], z["pos_index"], z["scores"], z["doc_ids"])
