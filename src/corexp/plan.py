"""What a job will do, resolved from its config without loading a model: `python -m corexp dry_run=true`.

The plan is what the validation property test checks values against (e.g. the number of evaluation queries equals
`data.max_queries` when it is positive), and what a user reads before starting a long sweep.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from corexp.data import load_dataset, select_queries
from corexp.labels import method_label, run_name


def flat_params(cfg: DictConfig) -> dict[str, Any]:
    from corexp.tracking import flatten

    groups = ("model", "data", "heads", "truncation", "prompt", "fusion", "first_stage")
    return flatten({g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups if g in cfg})


def job_plan(cfg: DictConfig) -> dict[str, Any]:
    """Data set, queries, candidates, method, head count, truncation and detection of one job."""
    ds = load_dataset(cfg.data)
    qids = select_queries(ds, cfg.data.max_queries, cfg.data.get("query_ids"))
    p = flat_params(cfg)
    metric = cfg.heads.metric
    detection = None
    if metric in ("core", "qrhead"):
        det = cfg.detection
        detection = {"data": det.name, "queries": det.num_queries, "negatives": det.num_negatives,
                     "positions": det.positions, "instances": det.num_queries * det.positions,
                     "max_words": det.max_words if det.get("max_words") is not None else cfg.prompt.max_words}
    return {
        "run_name": run_name(p),
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "queries": len(qids),
        "first_stage": cfg.first_stage.source,
        "depth": int(cfg.first_stage.depth),
        "method": method_label(p),
        "heads": "all" if metric == "all" else int(cfg.heads.k),
        "tau": (cfg.heads.tau if cfg.heads.tau is not None else cfg.model.tau) if metric == "core" else None,
        "truncation": {"mode": cfg.truncation.mode, "fraction": cfg.truncation.fraction, "layers": cfg.truncation.layers},
        "prompt": cfg.prompt.name,
        "max_words": cfg.prompt.max_words,
        "doc_order": cfg.prompt.doc_order,
        "fusion": {"mode": cfg.fusion.mode, "alpha": cfg.fusion.alpha, "rrf_k": cfg.fusion.rrf_k},
        "detection": detection,
        "dtype": cfg.model.dtype,
        "device": cfg.model.device,
    }
