"""Runs you can trust: a run's identity includes the code that computed it; live runs are never failed; two processes
given one config compute it once."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from corexp.tracking.liveness import ProcessId

from tiny_models import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def job_args(tiny, tmp_path, *extra):
    return [f"model.path={tiny}", "model.gguf=null", "model.template=plain", "model.name=tiny", "prompt.max_words=20",
            "data.max_queries=3", "first_stage.depth=4", "heads=random", "heads.k=3", "progress=false",
            f"paths.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/m.db", *extra]


def cli(args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "corexp", *args], capture_output=True, text=True, timeout=900,
                          env=env or dict(os.environ), cwd=cwd)


def runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    return mlflow.search_runs(experiment_names=["corexp"], output_format="list")


def test_the_code_digest_covers_the_compute_path_only(tmp_path):
    """Editing a report module, a study, the CLI or a docstring of scoring code leaves the digest as it is; a change
    of scoring code changes it."""
    from corexp.tracking.identity import code_digest

    package = tmp_path / "corexp"
    shutil.copytree(ROOT / "src" / "corexp", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(package)
    with open(package / "report" / "tables.py", "a") as fh:
        fh.write("\nREPORT_EDIT = 1\n")
    with open(package / "studies" / "scaling.py", "a") as fh:
        fh.write("\nSTUDY_EDIT = 1\n")
    scoring = package / "engine" / "scoring.py"
    text = scoring.read_text()
    scoring.write_text(text.replace('"""Per document: sum of c_j', '"""Reworded. Per document: sum of c_j', 1) + "\n# a comment\n")
    assert scoring.read_text() != text and code_digest.__wrapped__(package) == before
    scoring.write_text(text.replace("threshold = c.mean() - 2 * c.std(unbiased=True)",
                                    "threshold = c.mean() - 2.0 * c.std(unbiased=True)", 1))
    assert code_digest.__wrapped__(package) != before


def test_an_atlas_computation_edit_reruns_the_atlas_a_log_format_edit_reruns_nothing(tmp_path):
    """The digest covers exactly what computes a logged number: the atlas's computation (pipeline/atlas.py) and the
    job's metrics (pipeline/results.py) are in; how they are logged (pipeline/record.py, pipeline/atlas_record.py) and
    reported (studies/atlas.py) is out."""
    from corexp.tracking.identity import code_digest

    package = tmp_path / "corexp"
    shutil.copytree(ROOT / "src" / "corexp", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest.__wrapped__(package)
    record = package / "pipeline" / "record.py"
    text = record.read_text()
    record.write_text(text.replace('"selected_heads.json"', '"chosen_heads.json"').replace(
        '{"dataset": job.data.name,', '{"data_set": job.data.name,'))
    assert record.read_text() != text
    with open(package / "studies" / "atlas.py", "a") as fh:
        fh.write("\nATLAS_REPORT_FORMAT = 2\n")
    logged = package / "pipeline" / "atlas_record.py"
    logged.write_text(logged.read_text().replace('"best_head.nDCG_at_10"', '"best_single_head.nDCG_at_10"'))
    assert code_digest.__wrapped__(package) == before
    atlas = package / "pipeline" / "atlas.py"
    code = atlas.read_text()
    atlas.write_text(code.replace('.head(k)', '.head(k + 1)', 1))
    assert atlas.read_text() != code and code_digest.__wrapped__(package) != before
    atlas.write_text(code)
    results = package / "pipeline" / "results.py"
    results.write_text(results.read_text().replace("np.percentile(lat, 95)", "np.percentile(lat, 90)", 1))
    assert code_digest.__wrapped__(package) != before


def test_a_code_change_reruns_the_config_and_unchanged_code_skips(tmp_path, tiny):
    """A copy of the package (src/corexp + conf) stands for a checkout: editing its scoring code changes the runs'
    identity; the rerun says why in one line, and a third run with the same code skips. Editing a report module does
    not rerun anything."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "src" / "corexp", checkout / "src" / "corexp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", checkout / "conf")
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    args = job_args(tiny, tmp_path, f"hydra.run.dir={tmp_path}/out")
    first = cli(args, env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (digest_a,) = {r.data.tags["code_digest"] for r in runs(tmp_path)}
    with open(checkout / "src" / "corexp" / "report" / "tables.py", "a") as fh:
        fh.write("\n# a change to the report\nREPORT_VERSION = 2\n")
    unchanged = cli(args, env, cwd=tmp_path)
    assert unchanged.returncode == 0 and "corexp: skipped" in unchanged.stdout, unchanged.stderr[-2000:]
    with open(checkout / "src" / "corexp" / "engine" / "scoring.py", "a") as fh:
        fh.write("\nSCORING_REVISION = 2  # a change to the code that computes results\n")
    second = cli(args, env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    said = second.stdout + second.stderr
    assert "rerunning: the code changed since run" in said and f"(code {digest_a} -> " in said
    third = cli(args, env, cwd=tmp_path)
    assert third.returncode == 0 and "already FINISHED this config with this code" in third.stdout + third.stderr
    assert "corexp: skipped" in third.stdout
    finished = [r for r in runs(tmp_path) if r.info.status == "FINISHED"]
    assert len(finished) == 2 and len({r.data.tags["code_digest"] for r in finished}) == 2
    assert len({r.data.tags["config_hash"] for r in finished}) == 1


def test_two_processes_on_one_config_compute_it_once(tmp_path, tiny):
    """Launched at the same moment: one computes, the other waits for it and then skips; no FAILED run."""
    procs = [subprocess.Popen([sys.executable, "-m", "corexp", *job_args(tiny, tmp_path, f"hydra.run.dir={tmp_path}/o{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    stored = runs(tmp_path)
    assert [r.info.status for r in stored] == ["FINISHED"]
    logs = [o + e for o, e in outs]
    waited = [log for log in logs if "waiting for it, then skipping" in log]
    computed = [log for log in logs if "corexp: finished:" in log]
    assert len(computed) == 1 and (len(waited) == 1 or sum("skipped" in log for log in logs) == 1), logs


def test_liveness_cannot_be_fooled_by_pid_reuse_or_a_shared_host_name():
    """Same kernel and pid namespace: a pid is alive only with its recorded start time (a reused pid is dead); another
    boot id (a cloned VM with the same host name) or another pid namespace (a container with host networking) is
    judged by its heartbeat alone, never by a pid that means something else there."""
    from corexp.tracking.liveness import ProcessId, is_alive, start_ticks

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here, now = ProcessId.current(), time.time()
    assert here.boot_id and here.pid_ns and here.start == start_ticks(os.getpid())
    me = here.tags()
    old = (now - 9999) * 1000
    assert is_alive(me, old, 600, now, here)  # old, but its process lives
    assert not is_alive({**me, "pid": str(dead.pid), "pid_start": "1"}, now * 1000, 600, now, here)  # gone
    assert not is_alive({**me, "pid_start": str(int(here.start) + 1)}, old, 600, now, here)  # the pid was reused
    clone = {**me, "boot_id": "another-boot"}  # same host name and pid, another machine
    assert is_alive({**clone, "heartbeat": str(now - 60)}, old, 600, now, here)
    assert not is_alive({**clone, "heartbeat": str(now - 601)}, old, 600, now, here)
    container = {**me, "pid_ns": "pid:[1]", "pid": str(dead.pid)}  # its pid means nothing in this namespace
    assert is_alive({**container, "heartbeat": str(now - 5)}, old, 600, now, here)
    assert not is_alive({"host": here.host, "pid": str(os.getpid())}, (now - 700) * 1000, 600, now, here)  # no heartbeat


def test_liveness_never_trusts_a_foreign_clock_or_a_malformed_heartbeat(caplog):
    """A heartbeat stamped an hour in the reader's future (the other host's clock runs ahead) counts from when the
    reader first saw it: alive now, stale once that value has not changed for stale_after_s by the reader's clock, alive
    again when it changes. A heartbeat that is not a number is stale, with one warning line."""
    from corexp.tracking.liveness import ProcessId, is_alive

    here, now = ProcessId.current(), time.time()
    foreign = {**here.tags(), "boot_id": "another-machine", "heartbeat": str(now + 3600)}
    old = (now - 9999) * 1000
    assert is_alive(foreign, old, 30, now, here, run_id="r1")
    assert is_alive(foreign, old, 30, now + 29, here, run_id="r1")
    assert not is_alive(foreign, old, 30, now + 31, here, run_id="r1")  # before: alive for an hour and 30 s
    assert is_alive({**foreign, "heartbeat": str(now + 3630)}, old, 30, now + 31, here, run_id="r1")  # it beat again
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert not is_alive({**foreign, "heartbeat": "soon"}, old, 600, now, here, run_id="r2")
    assert [r.getMessage() for r in caplog.records].count(
        "run r2 has a malformed heartbeat tag 'soon'; it counts as stale") == 1


def test_waiting_for_another_run_has_a_limit_and_says_so(tmp_path):
    from corexp.errors import CorexpError
    from corexp.tracking.liveness import ProcessId
    from corexp.tracking.tracker import StoredRun, TrackingSpec

    tracker = TrackingSpec(uri=f"sqlite:///{tmp_path}/m.db", experiment="w", wait_limit_s=2).open()
    other = tracker.client.create_run(tracker.experiment_id, tags=ProcessId.current().tags())  # a live process's run
    t0 = time.time()
    with pytest.raises(CorexpError, match=r"still RUNNING after the 2 s this job waits \(tracking.wait_limit_s\)"):
        tracker.wait_for(StoredRun.of(tracker.client.get_run(other.info.run_id)), poll_s=0.2)
    assert time.time() - t0 < 10


def test_a_killed_run_of_another_config_is_failed_by_the_next_job(tmp_path, tiny):
    """A job killed mid-run (its pid gone from this host) is failed by the next job in the experiment, whatever that
    job's config (a bf16 rerun of a killed fp32 run used to leave the killed run RUNNING)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    exp = mlflow.create_experiment("corexp", artifact_location=(tmp_path / "art").as_uri())
    client = mlflow.MlflowClient()
    here = ProcessId.current().tags()
    killed = client.create_run(exp, tags={**here, "pid": str(dead.pid), "pid_start": "1", "config_hash": "other"})
    alive = client.create_run(exp, tags={**here, "config_hash": "other"})
    proc = cli(job_args(tiny, tmp_path, f"hydra.run.dir={tmp_path}/out", "model.dtype=bfloat16"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    (new,) = [r for r in runs(tmp_path) if r.info.status == "FINISHED"]
    assert " · bf16 · " in new.info.run_name  # not the fp32 run's name with a " #2"


def test_editing_a_judgment_reruns_the_config_and_says_so(tmp_path, tiny):
    """Identity holds the data's content: a new judgment in qrels/test.tsv of a local folder reruns the job with one
    line; a copy of the folder elsewhere (another clone) is the same identity and skips."""
    from corexp.locations import RESOURCES_DIR

    data = tmp_path / "data"
    shutil.copytree(RESOURCES_DIR / "scifact_sample", data)
    args = job_args(tiny, tmp_path, f"data.local_dir={data}", "heads=all", f"hydra.run.dir={tmp_path}/out")
    first = cli(args)
    assert first.returncode == 0, first.stderr[-2000:]
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    again = cli([a.replace(str(data), str(moved)) for a in args])
    assert again.returncode == 0 and "corexp: skipped" in again.stdout, again.stderr[-2000:]
    qid = (data / "qrels" / "test.tsv").read_text().splitlines()[1].split("\t")[0]
    with open(data / "qrels" / "test.tsv", "a") as fh:
        fh.write(f"{qid}\t4983\t1\n")
    changed = cli(args)
    said = changed.stdout + changed.stderr
    assert changed.returncode == 0 and "rerunning: the data changed since run" in said, said[-2000:]
    finished = [r for r in runs(tmp_path) if r.info.status == "FINISHED"]
    assert len(finished) == 2 and len({r.data.tags["data_fingerprint"] for r in finished}) == 2
    assert len({r.data.tags["setup_hash"] for r in finished}) == 1


@pytest.mark.slow
def test_sigterm_fails_the_run_with_its_reason(tmp_path):
    """A scheduler's cancel (SIGTERM) mid-job: the run is FAILED at once, tagged with why, not left RUNNING.

    The job is the real SmolLM2 over all 50 sample queries (minutes of work), so the signal always lands mid-job; a
    tiny random model finished 40 queries before the first poll on an idle machine and the signal came too late."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "corexp", "heads=all", "progress=false",
                             f"tracking.uri=sqlite:///{tmp_path}/m.db", f"hydra.run.dir={tmp_path}/out"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and \
            not [r for r in runs_or_empty(tmp_path) if r.info.status == "RUNNING"]:
        time.sleep(0.5)
    assert proc.poll() is None, "the job ended before it could be signalled: " + proc.communicate()[1][-2000:]
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    (run,) = runs(tmp_path)
    assert run.data.tags["failure"].startswith("terminated by SIGTERM"), run.data.tags
    assert run.info.status == "FAILED" and "rerank.nDCG_at_10" not in run.data.metrics


def runs_or_empty(tmp_path):
    try:
        return runs(tmp_path)
    except Exception:
        return []
