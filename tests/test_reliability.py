"""Crash safety and reproducibility: atomic cache writes, identical reruns, a SIGKILLed job recovered on rerun."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from corexp.files import atomic_write_text
from corexp.job import Job
from corexp.pipeline.run import run_job

from helpers import compose_cfg
from tiny_models import save_tiny_checkpoint


def test_interrupted_atomic_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "run.trec"
    atomic_write_text(target, "old\n")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new content that must never be half-written\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def tiny_overrides(tiny_dir, tmp_path):
    return [f"model.path={tiny_dir}", "model.gguf=null", "model.template=plain", "model.name=tiny", "prompt.max_words=20",
            f"paths.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/m.db", "progress=false"]


def test_same_config_twice_gives_identical_trec_run(tmp_path, tiny_dir):
    runs = []
    for i in range(2):
        cfg = compose_cfg([*tiny_overrides(tiny_dir, tmp_path), f"paths.output_dir={tmp_path}/out{i}", "data.max_queries=3",
                           "first_stage.depth=5", "heads=random", "heads.k=3", "prompt=shuffled", "force=true"])
        run_job(Job.from_config(cfg))
        runs.append((tmp_path / f"out{i}" / "rerank.trec").read_text())
    assert runs[0] == runs[1] and len(runs[0].splitlines()) == 15


def test_sigkilled_job_is_marked_failed_and_rerun(tmp_path, tiny_dir):
    env = {**os.environ}
    cmd = [sys.executable, "-m", "corexp", *tiny_overrides(tiny_dir, tmp_path), f"hydra.run.dir={tmp_path}/out",
           "data.max_queries=50", "first_stage.depth=10",
           "detection.num_queries=4", "detection.max_words=20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r.info.status == "RUNNING" for r in mlflow.search_runs(experiment_names=["corexp"], output_format="list")):
                break
        except Exception:
            pass
        time.sleep(0.5)
    assert proc.poll() is None, "job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    runs = mlflow.search_runs(experiment_names=["corexp"], output_format="list")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert "already FINISHED" in third.stderr + third.stdout


def test_parent_run_of_a_killed_sweep_is_marked_failed(tmp_path):
    from corexp.tracking.liveness import ProcessId
    from corexp.tracking.tracker import TrackingSpec

    tracker = TrackingSpec(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="sweeps").open()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer exists
    here = {f"sweep_{k}": v for k, v in ProcessId.current().tags().items()}
    client, exp = tracker.client, tracker.experiment_id
    killed = client.create_run(exp, tags={"sweep": "parent", **here, "sweep_pid": str(dead.pid), "sweep_pid_start": "1"}).info.run_id
    alive = client.create_run(exp, tags={"sweep": "parent", **here}).info.run_id
    remote = client.create_run(exp, tags={"sweep": "parent", **here, "sweep_boot_id": "another-machine",
                                          "sweep_pid": str(dead.pid)}).info.run_id
    assert tracker.fail_killed_sweeps() == 1
    status = {r: client.get_run(r).info.status for r in (killed, alive, remote)}
    assert status == {killed: "FAILED", alive: "RUNNING", remote: "RUNNING"}
    assert "killed" in client.get_run(killed).data.tags["failure"]
