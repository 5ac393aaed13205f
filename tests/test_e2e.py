"""`python -m corexp` end to end: real Hydra CLI, real data, a real MLflow store."""

import math
import os
import subprocess
import sys

import mlflow
import pytest

from tiny_models import save_tiny_checkpoint


def run_cli(tmp_path, *overrides, expect_ok=True):
    env = {**os.environ, "COREXP_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "corexp", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.run.dir={tmp_path}/out", "progress=false", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def finished_runs(tmp_path, experiment="corexp"):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


def tiny_model_args(tiny_dir):
    return [f"model.path={tiny_dir}", "model.gguf=null", "model.template=plain", "model.name=tiny", "prompt.max_words=30"]


def test_default_job_shrunk_logs_to_mlflow(tmp_path, tiny_dir):
    run_cli(tmp_path, *tiny_model_args(tiny_dir), "data.max_queries=3", "first_stage.depth=4", "detection.num_queries=4",
            "detection.max_words=20")
    (run,) = finished_runs(tmp_path)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert math.isfinite(m["rerank.nDCG_at_10"]) and math.isfinite(m["first_stage.nDCG_at_10"])
    assert m["queries"] == 3 and m["latency_p95_s"] >= m["latency_p50_s"] > 0
    assert run.data.params["heads.name"] == "core" and run.data.tags["dataset"] == "scifact-sample"
    # detection shrunk from the default set's settings changes the numbers, so the name says so
    assert run.info.run_name.startswith(
        "tiny · CoRe-k8 τ=0.1 · trunc=auto · detected on scifact-train-sample (num_queries=4, max_words=20) · scifact-sample")
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "rerank.trec", "first_stage.trec", "per_query.csv", "scores.csv"} <= arts
    lines = (tmp_path / "out" / "rerank.trec").read_text().split("\n")[:4]
    assert len({l.split()[2] for l in lines}) == 4


def test_core_heads_with_auto_truncation_log_head_artifacts(tmp_path, tiny_dir):
    run_cli(tmp_path, *tiny_model_args(tiny_dir), "data.max_queries=2", "first_stage.depth=3", "heads=core", "heads.k=3",
            "truncation=auto", "detection.num_queries=4", "detection.num_negatives=3")
    (run,) = finished_runs(tmp_path)
    heads = run.data.params["selected_heads"].split(",")
    assert len(heads) == 3 and run.data.metrics["kept_layers"] == max(int(h.split("-")[0]) for h in heads) + 1
    assert {"heads.layer_mean", "heads.share_upper_third", "heads.jaccard_core_vs_qrhead"} <= set(run.data.metrics)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"heads_per_layer.png", "head_scores.png", "head_scores.csv", "selected_heads.json"} <= arts


def test_bad_input_is_one_line_and_no_traceback(tmp_path, tiny_dir):
    proc = run_cli(tmp_path, *tiny_model_args(tiny_dir), "heads=random", "heads.k=0", expect_ok=False)
    assert proc.returncode == 2
    assert "corexp: error: heads.k=0 is not allowed" in proc.stderr and "Traceback" not in proc.stderr
    assert all(r.info.status != "RUNNING" for r in finished_runs(tmp_path))


@pytest.mark.slow
def test_default_job_with_real_smollm2(tmp_path):
    run_cli(tmp_path, "data.max_queries=2", "first_stage.depth=5", "detection.num_queries=4")  # the default job, shrunk
    (run,) = finished_runs(tmp_path)
    assert run.data.tags["model"] == "smollm2" and math.isfinite(run.data.metrics["rerank.nDCG_at_10"])
    assert run.data.params["heads.name"] == "core" and run.data.metrics["kept_layers"] <= 30
    assert run.data.tags["model_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert run.data.metrics["span_mismatches"] == 0


def test_unknown_model_name_lists_the_options(tmp_path):
    proc = run_cli(tmp_path, "model=nosuch", expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model=nosuch is not an option; choose one of" in proc.stderr and "smollm2" in proc.stderr


@pytest.mark.parametrize("offline_env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_uncached_hub_model_fails_fast_with_one_line(tmp_path, offline_env):
    """`python -m corexp model=mistral` without the model in the local cache: one line naming the id and the fixes,
    within seconds, no traceback, no MLflow run (an unreachable endpoint stands for this machine's closed network)."""
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(offline_env, HF_HOME=str(tmp_path / "hf"), COREXP_CACHE=str(tmp_path / "cache"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "corexp", "model=mistral", "heads.k=8",
                           f"tracking.uri=sqlite:///{tmp_path}/m.db", f"hydra.run.dir={tmp_path}/out"],
                          capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.perf_counter() - t0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("corexp: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1
    assert "'mistralai/Mistral-7B-Instruct-v0.2'" in lines[0] and "model.path=<local folder>" in lines[0]
    assert "hf download mistralai/Mistral-7B-Instruct-v0.2" in lines[0]
    assert not (tmp_path / "m.db").exists()  # checked before MLflow is opened
    assert elapsed < 60  # ~8 s here, mostly imports; Hugging Face's retries took 55 s before
