"""What a job's MLflow run holds: data set tags and input, metrics, the chosen heads (table, figures), TREC runs and the
per-query table, all under one metric-name scheme (corexp.data.evaluation.metric_key: `rerank.nDCG_at_10`)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from corexp.components import heads as H
from corexp.data.datasets import write_trec_run
from corexp.job import Job
from corexp.pipeline.results import EvalData, JobResult, length_bias, per_query_rows, result_metrics
from corexp.tracking.figures import heads_histogram, score_heatmap
from corexp.tracking.tracker import ActiveRun


def output_dir(job: Job) -> Path:
    """The job's folder: Hydra's run or sweep folder, or (Python API) a new folder under <root>/outputs/."""
    folder = Path(job.paths.output_dir) if job.paths.output_dir else \
        Path(job.paths.root_dir) / "outputs" / "api" / f"{time.strftime('%Y-%m-%d/%H-%M-%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def log_data(run: ActiveRun, job: Job, data: EvalData) -> None:
    """Tags and an MLflow dataset input (name, digest, source): the runs table's Dataset column and filter."""
    ds = data.ds
    run.set_tags({"dataset": job.data.name, "first_stage": data.candidates.provenance})
    source = ds.meta.get("source", job.data.name)
    uri = source if "://" in source else ("https://ir-datasets.com/" + source.split("/")[0] + ".html"
                                           if not source.startswith("/") else Path(source).as_uri())
    run.log_dataset(job.data.name, uri, hashlib.sha256(ds.fingerprint.encode()).hexdigest()[:12])


def log_result(run: ActiveRun, job: Job, res: JobResult, out_dir: Path) -> None:
    """Metrics, head artifacts, TREC runs and per-query tables of one finished job."""
    import pandas as pd

    if res.selection.reselected:
        run.set_tags({"heads_reselected": "true"})
    run.set_tags({"model_source": res.model_loaded, "model_sha256": res.model.sha256 or "n/a"})
    log_heads(run, job, res, out_dir)
    bias = length_bias(res)  # once: the metrics and the per-query table both report it
    metrics = result_metrics(res, job.measures, bias)
    run.log_metrics(metrics)
    write_trec_run(res.reranking.run, out_dir / "rerank.trec", f"corexp-{job.heads.name}")
    write_trec_run(res.data.candidates.top, out_dir / "first_stage.trec", res.data.candidates.provenance)
    rows = per_query_rows(res, job.measures, bias)
    pd.DataFrame(rows).to_csv(out_dir / "per_query.csv", index=False)
    pd.DataFrame(res.reranking.rows).to_csv(out_dir / "scores.csv", index=False)
    run.log_artifacts([out_dir / f for f in ("rerank.trec", "first_stage.trec", "per_query.csv", "scores.csv")])


def log_fold_heads(run: ActiveRun, res: JobResult, out_dir: Path) -> None:
    """Cross-validation (detection.folds): each fold's heads, the queries they were detected on and the ones they
    scored (heads_by_fold.json), every head's detection score per fold (head_scores.csv), the folds' mean Jaccard."""
    import pandas as pd

    plan = res.plan
    sels = plan.selections
    run.log_params({"selected_heads": " | ".join(H.format_heads(s.heads) if s.heads else "all" for s in sels)})
    if plan.fold_jaccard_mean is not None:
        run.log_metrics({"heads.fold_jaccard_mean": plan.fold_jaccard_mean})
    folds = [{"fold": f, "heads": H.format_heads(s.heads or []), "metric": s.metric, "instances": s.instances,
              "window": list(s.window) if s.window else None, "detected_on": list(plan.detected_on[f]),
              "scored": sorted(q for q, g in plan.fold_of.items() if g == f)} for f, s in enumerate(sels)]
    run.log_dict({"folds": folds}, "heads_by_fold.json")
    rows = [{"fold": f, "layer": l, "head": h, "score": float(s.scores[l, h]), "selected": (l, h) in set(s.heads or [])}
            for f, s in enumerate(sels) if s.scores is not None
            for l in range(s.scores.shape[0]) for h in range(s.scores.shape[1])]
    if rows:
        pd.DataFrame(rows).to_csv(out_dir / "head_scores.csv", index=False)
        run.log_artifacts([out_dir / "head_scores.csv"])


def log_heads(run: ActiveRun, job: Job, res: JobResult, out_dir: Path) -> None:
    import pandas as pd

    if res.plan is not None and res.plan.folds:
        log_fold_heads(run, res, out_dir)
        return
    sel, n_layers, n_heads = res.selection, res.model.n_layers, res.model.n_heads
    if sel.heads is None:
        run.log_params({"selected_heads": "all"})
        return
    heads = sel.heads
    run.log_params({"selected_heads": H.format_heads(heads)})
    run.log_metrics({f"heads.{k}": v for k, v in H.layer_stats(heads, n_layers).items()})
    if sel.window is not None:
        run.log_params({"selected_window": f"{sel.window[0]}-{sel.window[1]}"})
        run.log_dict({"window": list(sel.window), "scores_by_first_layer": [float(x) for x in sel.window_scores]},
                     "selected_window.json")
    if sel.jaccard_core_qrhead is not None:  # overlap of the two metrics' top-k on the same detection data
        run.log_metrics({"heads.jaccard_core_vs_qrhead": sel.jaccard_core_qrhead})
    title = f"{job.model.name} {job.heads.name} top-{len(heads)}"
    paths = [heads_histogram(heads, n_layers, out_dir / "heads_per_layer.png", title)]
    scores = sel.scores
    selected = set(heads)
    table = [{"layer": l, "head": h, "score": float(scores[l, h]), "selected": (l, h) in selected}
             for l in range(n_layers) for h in range(n_heads)] if scores is not None else \
        [{"layer": l, "head": h, "score": None, "selected": True} for l, h in heads]
    pd.DataFrame(table).to_csv(out_dir / "head_scores.csv", index=False)
    paths.append(out_dir / "head_scores.csv")
    if scores is not None:
        paths.append(score_heatmap(scores, heads, out_dir / "head_scores.png", title))
        detail = [{"layer": l, "head": h, "score": float(scores[l, h])} for l, h in heads]
        run.log_dict({"metric": sel.metric, "tau": sel.tau, "instances": sel.instances, "heads": detail}, "selected_heads.json")
    run.log_artifacts(paths)
