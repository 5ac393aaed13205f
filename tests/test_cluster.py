"""The cluster path on one machine: submitit's local executor (SLURM's process model), an MLflow tracking server with
parallel jobs, and caches shared by concurrent processes and by checkouts at other paths."""

import os
import shutil
import subprocess
import sys
import time

import mlflow
import pytest

from helpers import mlflow_server
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def tiny_args(tiny, tmp):
    return ["progress=false", f"model.path={tiny}", "model.gguf=null", "model.template=plain", "model.name=tiny",
            "prompt.max_words=20", "data.max_queries=2", "first_stage.depth=3", f"paths.cache_dir={tmp}/cache"]


def cli(*args, timeout=900, env=None):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "corexp", *args], capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.perf_counter() - t0


def test_the_cluster_recipes_authenticated_server(tmp_path, tiny):
    """The README's tracking server with MLflow's basic authentication: a job with credentials logs its run; without
    them it stops in one line that names the fix."""
    secret = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-Admin-pw", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32}
    with mlflow_server(f"sqlite:///{tmp_path}/m.db", "--artifacts-destination", str(tmp_path / "art"), "--app-name", "basic-auth",
                       env=secret, log_file=tmp_path / "server.log") as url:
        args = [*tiny_args(tiny, tmp_path), "heads=all", "tracking=server", f"tracking.uri={url}", f"hydra.run.dir={tmp_path}/o"]
        bare = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        refused, _ = cli(*args, env=bare)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "refused a job without credentials" in refused.stderr and "MLFLOW_TRACKING_USERNAME" in refused.stderr
        ok, _ = cli(*args, env={**bare, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "s3cret-Admin-pw"})
        assert ok.returncode == 0, ok.stderr[-2000:]
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="s3cret-Admin-pw")
        try:
            mlflow.set_tracking_uri(url)
            (run,) = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
            assert run.info.status == "FINISHED" and "rerank.nDCG_at_10" in run.data.metrics
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME")
            os.environ.pop("MLFLOW_TRACKING_PASSWORD")


def test_submitit_local_sweep_parent_children_resume_and_failure(tmp_path, tiny):
    """hydra/launcher=submitit_local: pickled jobs in separate processes with their own log folders, as on SLURM."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/sweep", "hydra/launcher=submitit_local",
              *tiny_args(tiny, tmp_path), "heads=all,random", "heads.k=3"]
    first, secs = cli("-m", *common)
    print(f"submitit_local 2-job sweep: {secs:.0f} s")
    assert first.returncode == 0, first.stderr[-3000:]
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))  # submitit's per-job logs
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len({r.info.run_name for r in children}) == 2

    again, secs = cli("-m", *common)  # resume: both already FINISHED
    print(f"rerun (both skipped): {secs:.0f} s")
    assert again.returncode == 0, again.stderr[-2000:]
    runs = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    assert sum(1 for r in runs if r.data.tags.get("sweep") != "parent") == 2  # no new child runs
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    assert logs.count("already FINISHED this config") == 2  # the log line, once per job

    # a job that raises is FAILED, the other one finishes
    failing, _ = cli("-m", f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/sweep2", "hydra/launcher=submitit_local",
                     *tiny_args(tiny, tmp_path), "heads=all,published", "data.max_queries=1")
    runs = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    new = [r for r in runs if r.data.tags.get("sweep") != "parent" and r.data.params.get("data.max_queries") == "1"]
    assert sorted((r.data.tags["method"], r.info.status) for r in new) == [("ICR", "FINISHED"), ("published-k8", "FAILED")]
    assert "no published head list" in failing.stderr + failing.stdout + "".join(
        p.read_text() for p in (tmp_path / "sweep2" / ".submitit").rglob("*_log.*"))


@pytest.fixture()
def server(tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "served-artifacts"),
                       "--workers", "2", log_file=tmp_path / "server.log") as uri:
        yield uri


def test_parallel_sweep_logs_to_a_tracking_server(tmp_path, tiny, server):
    """tracking=server with 4 concurrent joblib workers: every run once, with metrics and proxied artifacts."""
    proc, secs = cli("-m", "tracking=server", f"tracking.uri={server}", f"hydra.sweep.dir={tmp_path}/sweep",
                     "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=4", *tiny_args(tiny, tmp_path),
                     "heads=random", "heads.k=2,3,4,5")
    print(f"4-worker sweep against the server: {secs:.0f} s")
    server_log = (tmp_path / "server.log").read_text()[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n--- server log ---\n" + server_log
    mlflow.set_tracking_uri(server)
    runs = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["config_hash"] for r in children}) == 4
    client = mlflow.MlflowClient()
    for r in children:
        assert "rerank.nDCG_at_10" in r.data.metrics
        assert r.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server's proxy, no shared folder
        assert {"per_query.csv", "rerank.trec", "config.yaml"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    assert list((tmp_path / "served-artifacts").rglob("per_query.csv"))


def _job(tiny, cache, store, out):
    return subprocess.Popen([sys.executable, "-m", "corexp", *tiny_args(tiny, cache), "heads=core", "heads.k=2",
                             "detection.num_queries=6", "detection.num_negatives=3", f"tracking.uri={store}",
                             f"hydra.run.dir={out}", "first_stage=bm25"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_jobs_share_one_cache_entry(tmp_path, tiny):
    """Two processes needing the same BM25 run and detection table at once: one computes, both finish, one file."""
    procs = [_job(tiny, tmp_path, f"sqlite:///{tmp_path}/m{i}.db", tmp_path / f"out{i}") for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    logs = "".join(o + e for o, e in outs)
    assert logs.count("head detection: 6 instances") == 1  # computed once, the other job waited for it
    assert len(list((tmp_path / "cache" / "detection").glob("*.npz"))) == 1
    assert len(list((tmp_path / "cache" / "runs").glob("bm25-*.trec"))) == 2  # eval queries and detection pool
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]


def test_a_moved_checkout_hits_the_same_caches(tmp_path, tiny):
    """Cache keys are content, not paths: the same data at another location reuses the detection table and run."""
    from corexp.config import RESOURCES_DIR

    a, b = tmp_path / "checkout-a" / "sample", tmp_path / "elsewhere" / "b" / "sample"
    for dest in (a, b):
        shutil.copytree(RESOURCES_DIR / "scifact_sample", dest)
    os.utime(b / "corpus.jsonl.gz", (1, 1))  # a fresh clone has other mtimes too
    base = [*tiny_args(tiny, tmp_path), "heads=core", "heads.k=2", "detection.num_queries=5", "detection.num_negatives=3",
            "first_stage=bm25", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    first, _ = cli(*base, f"data.local_dir={a}", f"detection.local_dir={a}", f"hydra.run.dir={tmp_path}/o1")
    assert first.returncode == 0, first.stderr[-2000:]
    second, _ = cli(*base, f"data.local_dir={b}", f"detection.local_dir={b}", f"hydra.run.dir={tmp_path}/o2", "force=true")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "head detection: 5 instances" in first.stdout + first.stderr
    assert "head detection" not in second.stdout + second.stderr and "computing BM25" not in second.stdout + second.stderr
    assert len(list((tmp_path / "cache" / "detection").glob("*.npz"))) == 1


def test_the_data_set_race_of_concurrent_jobs_is_retried(monkeypatch):
    """MLflow's server inserts a new data set after checking it is absent; two jobs doing that at once make one of
    them fail with a UNIQUE constraint (reproduced: 1 of 10 runs of the 4-worker sweep above). The losing job retries
    and only links the data set that now exists."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from corexp.tracking.tracker import ActiveRun

    calls = []

    class FakeMlflow:
        @staticmethod
        def log_input(dataset, context):
            calls.append(context)
            if len(calls) == 1:
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                      "datasets.name, datasets.digest")

    ActiveRun(SimpleNamespace(mlflow=FakeMlflow), "r", "n").log_dataset("scifact", "https://ir-datasets.com/beir.html", "d")
    assert calls == ["evaluation", "evaluation"]
    failing = type("M", (), {"log_input": staticmethod(lambda d, context: (_ for _ in ()).throw(MlflowException("other failure")))})
    with pytest.raises(MlflowException, match="other"):
        ActiveRun(SimpleNamespace(mlflow=failing), "r", "n").log_dataset("scifact", "https://ir-datasets.com/beir.html", "d")
