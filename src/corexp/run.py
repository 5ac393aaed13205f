"""One job: data -> first stage -> head selection -> (truncated) model -> re-rank -> evaluate -> MLflow."""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from corexp import heads as H
from corexp import tracking
from corexp.data import load_dataset, select_queries, write_trec_run
from corexp.detection import detection_masses
from corexp.errors import CorexpError
from corexp.evaluation import evaluate, parse_measures, safe_name
from corexp.first_stage import candidates, first_stage_run
from corexp.models import load_model, model_dims
from corexp.plots import heads_histogram, score_heatmap
from corexp.prompt import for_dataset
from corexp.reranker import AttentionReranker
from corexp.scoring import fuse, rank, trec_scores

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_layers(cfg: DictConfig, n_layers: int, heads: list[H.Head] | None) -> int:
    mode = cfg.truncation.mode
    if mode == "none":
        return n_layers
    if mode == "auto":
        return n_layers if heads is None else max(l for l, _ in heads) + 1
    if mode == "fraction":
        p = float(cfg.truncation.fraction)
        if not 0 <= p < 1:
            raise CorexpError(f"truncation.fraction must be in [0, 1), got {p}")
        return max(1, math.floor((1 - p) * n_layers))
    if mode == "layers":
        n = int(cfg.truncation.layers or 0)
        if not 1 <= n <= n_layers:
            raise CorexpError(f"truncation.layers must be in 1..{n_layers}, got {n}")
        return n
    raise CorexpError(f"truncation.mode must be none, auto, fraction or layers, got '{mode}'")


def prompt_for(cfg: DictConfig) -> Any:
    """The prompt config as used on this job's data set (ICR's question instruction / text-only rule)."""
    return for_dataset(cfg.prompt, cfg.data.name, bool(cfg.data.get("question_style")))


def select_heads(cfg: DictConfig, eval_qids: list[str], dims: tuple[int, int]) -> tuple[list[H.Head] | None, dict[str, Any]]:
    """The head set of this run and what to log about it (scores table, layer statistics)."""
    metric, k = cfg.heads.metric, int(cfg.heads.k)
    if metric not in H.METRICS:
        raise CorexpError(f"heads.metric must be one of {', '.join(H.METRICS)}, got '{metric}'")
    info: dict[str, Any] = {"metric": metric}
    if metric == "all":
        return None, info
    if metric == "published":
        return H.published_heads(cfg.model, k), info
    if metric == "random":
        return H.random_heads(dims[0], dims[1], k, int(cfg.heads.seed)), info
    cache = Path(cfg.paths.cache_dir)
    tau = float(cfg.heads.tau if cfg.heads.tau is not None else cfg.model.tau)
    if metric == "core" and not (tau > 0 and math.isfinite(tau)):
        raise CorexpError(f"heads.tau must be a positive finite number, got {tau}")
    lm = load_model(cfg.model, cache)
    H.check_k(k, lm.num_layers * lm.num_heads)
    det_prompt = prompt_for(cfg)
    if cfg.detection.get("max_words") is not None:  # shorter detection documents: a cheaper detection pass
        det_prompt.max_words = int(cfg.detection.max_words)
    det_rr = AttentionReranker(lm, det_prompt, None, cfg.model.template)
    model_key = f"{cfg.model.name}:{lm.source}:{lm.sha256}:{cfg.model.dtype}"
    masses, pos = detection_masses(det_rr, set(eval_qids), cfg.detection, cfg.first_stage, cache, model_key, cfg.progress)
    core, qr = H.core_scores(masses, pos, tau), H.qrhead_scores(masses, pos)
    scores = core if metric == "core" else qr
    info.update(scores=scores, tau=tau if metric == "core" else None, instances=int(masses.shape[0]),
                jaccard_core_qrhead=H.jaccard(H.top_k(core, k), H.top_k(qr, k)))
    del lm, det_rr
    return H.top_k(scores, k), info


def run_job(cfg: DictConfig) -> dict[str, float]:
    """Run one configured job end to end and return its metrics."""
    seed_everything(int(cfg.seed))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    measures = parse_measures(list(cfg.data.measures))
    mlflow = tracking.setup(cfg)
    chash = tracking.config_hash(cfg)
    previous = tracking.find_runs(mlflow, cfg.tracking.experiment, chash)
    stale = tracking.fail_stale_runs(mlflow, previous)
    if stale:
        log.warning("marked %d stale RUNNING run(s) of this config FAILED", stale)
    done = [r for r in previous if r.info.status == "FINISHED"]
    if done and not cfg.get("force", False):
        log.info("skipping: run %s already FINISHED this exact config (force=true reruns it)", done[0].info.run_id)
        return dict(done[0].data.metrics)
    parent = tracking.sweep_parent_id(cfg)
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    override_str = " ".join(overrides)
    with mlflow.start_run(run_name=tracking.run_name(mlflow, cfg, overrides), parent_run_id=parent,
                          tags={"config_hash": chash, "overrides": override_str}) as active:
        tracking.log_config(mlflow, cfg)
        ds = load_dataset(cfg.data)
        qids = select_queries(ds, cfg.data.max_queries, cfg.data.get("query_ids"))
        full_run, fs_label = first_stage_run(ds, qids, cfg.first_stage, Path(cfg.paths.cache_dir), cfg.progress)
        cands = candidates(full_run, int(cfg.first_stage.depth), bool(cfg.data.drop_self_hits))
        mlflow.set_tags({"model": cfg.model.name, "dataset": cfg.data.name, "method": cfg.heads.metric,
                         "first_stage": fs_label})
        fs_means, fs_per_query = evaluate(ds.qrels, cands, measures)

        n_full, n_heads = model_dims(cfg.model, Path(cfg.paths.cache_dir))
        heads, head_info = select_heads(cfg, qids, (n_full, n_heads))
        if heads is not None:
            bad = [f"{l}-{h}" for l, h in heads if not (0 <= l < n_full and 0 <= h < n_heads)]
            if bad:
                raise CorexpError(f"heads {bad[:3]} are outside the model ({n_full} layers x {n_heads} heads)")
        keep = keep_layers(cfg, n_full, heads)
        if heads is not None and max(l for l, _ in heads) >= keep:
            if cfg.heads.metric == "published":
                raise CorexpError(f"truncation keeps {keep} layers but published heads reach layer {max(l for l, _ in heads)}; use truncation=auto or none")
            if "scores" in head_info:
                heads = H.top_k(head_info["scores"], int(cfg.heads.k), max_layer=keep)
            else:
                heads = H.random_heads(keep, n_heads, int(cfg.heads.k), int(cfg.heads.seed))
            log.warning("truncation to %d layers removed selected heads; re-selected among kept layers", keep)
            mlflow.set_tag("heads_reselected", "true")
        lm = load_model(cfg.model, Path(cfg.paths.cache_dir), keep_layers=keep)
        rr = AttentionReranker(lm, prompt_for(cfg), heads, cfg.model.template)
        mlflow.set_tags({"model_source": lm.source, "model_sha256": lm.sha256 or "n/a"})
        _log_heads(mlflow, heads, head_info, lm.num_layers, lm.num_heads, out_dir, cfg)

        reranked, raw_rows, latencies, tokens, dropped, mismatches = {}, [], [], [], 0, 0
        for qid in tqdm(qids, desc=f"re-rank {cfg.data.name} ({cfg.model.name})", disable=not cfg.progress):
            cand = cands[qid]
            if not cand:
                reranked[qid] = []
                continue
            ids = [d for d, _ in cand]
            found = ds.docs.get_many(ids)
            missing = [d for d in ids if d not in found]
            if missing:
                raise CorexpError(f"first-stage run lists document '{missing[0]}' for query {qid}, but the corpus has no such id")
            t0 = time.perf_counter()
            scores = rr.score(ds.queries[qid], [found[d] for d in ids], qid)
            latencies.append(time.perf_counter() - t0)
            tokens.append(rr.stats.prompt_tokens)
            dropped += rr.stats.dropped_docs
            mismatches += rr.stats.span_mismatches
            final = fuse(ids, scores, [s for _, s in cand], cfg.fusion.mode, float(cfg.fusion.alpha), int(cfg.fusion.rrf_k))
            ranked = rank(ids, final)
            reranked[qid] = trec_scores(ranked)
            raw_rows += [{"query_id": qid, "doc_id": d, "first_stage_rank": i + 1, "attention_score": scores[i],
                          "final_score": final[i]} for i, d in enumerate(ids)]
        rr_means, rr_per_query = evaluate(ds.qrels, reranked, measures)

        metrics: dict[str, float] = {}
        names = {}
        for prefix, means in (("first_stage", fs_means), ("rerank", rr_means)):
            for m, v in means.items():
                names[f"{prefix}.{m}"] = f"{prefix}.{safe_name(m)}"
                metrics[f"{prefix}.{safe_name(m)}"] = v
        if latencies:
            lat = np.array(latencies)
            metrics.update({"latency_mean_s": float(lat.mean()), "latency_p50_s": float(np.percentile(lat, 50)),
                            "latency_p95_s": float(np.percentile(lat, 95)), "prompt_tokens_mean": float(np.mean(tokens)),
                            "queries": float(len(qids)), "dropped_candidates": float(dropped),
                            "span_mismatches": float(mismatches), "kept_layers": float(keep),
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            if torch.cuda.is_available():
                metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        mlflow.log_metrics(metrics)
        write_trec_run(reranked, out_dir / "rerank.trec", f"corexp-{cfg.heads.metric}")
        write_trec_run(cands, out_dir / "first_stage.trec", fs_label)
        pq = pd.DataFrame([{"query_id": q, **{f"first_stage.{m}": fs_per_query[q][m] for m in fs_per_query[q]},
                            **{f"rerank.{m}": rr_per_query.get(q, {}).get(m, 0.0) for m in fs_per_query[q]}}
                           for q in sorted(fs_per_query)])
        pq.to_csv(out_dir / "per_query.csv", index=False)
        pd.DataFrame(raw_rows).to_csv(out_dir / "scores.csv", index=False)
        (out_dir / "metric_names.json").write_text(json.dumps(names, indent=1))
        for f in ("rerank.trec", "first_stage.trec", "per_query.csv", "scores.csv", "metric_names.json"):
            mlflow.log_artifact(str(out_dir / f))
        log.info("run %s: %s", active.info.run_id, {k: round(v, 4) for k, v in metrics.items() if "." in k})
    return metrics


def _log_heads(mlflow: Any, heads, info: dict[str, Any], n_layers: int, n_heads: int, out_dir: Path, cfg: DictConfig) -> None:
    if heads is None:
        mlflow.log_param("selected_heads", "all")
        return
    mlflow.log_param("selected_heads", H.format_heads(heads))
    mlflow.log_metrics({f"heads.{k}": v for k, v in H.layer_stats(heads, n_layers).items()})
    if "jaccard_core_qrhead" in info:  # overlap of the two metrics' top-k on the same detection data
        mlflow.log_metric("heads.jaccard_core_vs_qrhead", info["jaccard_core_qrhead"])
    title = f"{cfg.model.name} {cfg.heads.metric} top-{len(heads)}"
    mlflow.log_artifact(str(heads_histogram(heads, n_layers, out_dir / "heads_per_layer.png", title)))
    scores = info.get("scores")
    table = [{"layer": l, "head": h, "score": float(scores[l, h]) if scores is not None else None,
              "selected": (l, h) in set(heads)} for l in range(n_layers) for h in range(n_heads)] if scores is not None else \
        [{"layer": l, "head": h, "score": None, "selected": True} for l, h in heads]
    pd.DataFrame(table).to_csv(out_dir / "head_scores.csv", index=False)
    mlflow.log_artifact(str(out_dir / "head_scores.csv"))
    if scores is not None:
        mlflow.log_artifact(str(score_heatmap(scores, heads, out_dir / "head_scores.png", title)))
        sel = [{"layer": l, "head": h, "score": float(scores[l, h])} for l, h in heads]
        mlflow.log_dict({"metric": info["metric"], "tau": info.get("tau"), "instances": info.get("instances"), "heads": sel},
                        "selected_heads.json")
