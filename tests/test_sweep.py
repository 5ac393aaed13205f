"""Multirun: a parent run per sweep, child runs with tags, failed jobs marked FAILED, finished jobs skipped on rerun."""

import os
import subprocess
import sys

import mlflow

from tiny_models import save_tiny_checkpoint


def sweep(tmp_path, tiny, *extra):
    env = {**os.environ, "COREXP_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "corexp", "-m", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"hydra.sweep.dir={tmp_path}/sweep", "progress=false", f"model.path={tiny}", "model.gguf=null",
           "model.template=plain", "model.name=tiny", "prompt.max_words=20", "data.max_queries=2", "first_stage.depth=3",
           "heads=all,published", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_sweep_parent_children_failure_and_resume(tmp_path):
    tiny = save_tiny_checkpoint(tmp_path / "tiny")
    first = sweep(tmp_path, tiny)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(parents) == 1 and len(children) == 2, first.stderr[-2000:]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert parents[0].info.run_name.startswith("sweep · heads=all,published") and "+" not in parents[0].info.run_name
    status = {r.data.tags["method"]: r.info.status for r in children}
    assert status == {"ICR": "FINISHED", "published-k8": "FAILED"}
    assert all("heads=" in r.data.tags["overrides"] and r.data.tags["git_commit"] for r in children)
    second = sweep(tmp_path, tiny)
    assert "already FINISHED" in second.stderr + second.stdout
    runs = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    assert sum(1 for r in runs if r.data.tags.get("method") == "ICR") == 1  # skipped, not rerun
    assert all(r.info.status != "RUNNING" for r in runs if r.data.tags.get("sweep") != "parent")

    # the report is rebuilt identically from the same store
    from corexp.report.tables import write_report

    files_a, md_a = write_report(f"sqlite:///{tmp_path}/mlflow.db", ["corexp"], tmp_path / "rep_a", "nDCG@10", "BM25")
    files_b, md_b = write_report(f"sqlite:///{tmp_path}/mlflow.db", ["corexp"], tmp_path / "rep_b", "nDCG@10", "BM25")
    assert md_a == md_b
    assert [f.name for f in files_a] == [f.name for f in files_b] and "report.md" in [f.name for f in files_a]
    for fa, fb in zip(files_a, files_b):
        assert fa.read_bytes() == fb.read_bytes()
    md = (tmp_path / "rep_a" / "report.md").read_text()
    assert "## tiny" in md and "| ICR" in md and "| BM25" in md

    # the MLflow UI server on loopback lists this sweep's runs through its REST API
    import json
    import urllib.request

    from helpers import mlflow_server

    with mlflow_server(f"sqlite:///{tmp_path}/mlflow.db", "--workers", "1") as base:
        exp = json.load(urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=corexp"))
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]]}).encode(),
                                     headers={"Content-Type": "application/json"})
        found = json.load(urllib.request.urlopen(req))["runs"]
        assert len(found) == 5  # 2 sweep parents, the finished job once, the failing job twice
