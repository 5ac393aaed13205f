"""Nothing silent (issue: verified caches, degenerate scores, reused sweep folders, content fingerprints, user files):
each case ends in one line and a non-zero exit, or in the right result, never in a FINISHED run with a wrong one."""

import contextlib
import json
import os
import subprocess

import mlflow
import pytest
from test_cli_errors import assert_one_line, beir, run, tiny_model


def test_a_reused_sweep_folder_does_not_carry_old_failures(tmp_path, tiny, env):
    """An explicit hydra.sweep.dir used by a failing sweep and then by a good one: the good sweep exits 0 and its
    parent is FINISHED; the earlier parent stays FAILED with its own reason."""
    store, folder = f"sqlite:///{tmp_path}/s.db", tmp_path / "sweep"
    good = beir(tmp_path / "good")
    common = ["-m", *tiny_model(tiny), f"tracking.uri={store}", "tracking.experiment=reuse", f"hydra.sweep.dir={folder}"]
    first, out = run([*common, f"data.local_dir={tmp_path}/nowhere,{good}"], env)
    assert first.returncode == 1 and "1 of 2 jobs of the sweep failed" in out, out[-3000:]
    second, out = run([*common, f"data.local_dir={good}", "data.max_queries=1,2"], env)
    assert second.returncode == 0 and "jobs of the sweep failed" not in out, out[-3000:]
    mlflow.set_tracking_uri(store)
    parents = sorted((r for r in mlflow.search_runs(experiment_names=["reuse"], output_format="list")
                      if r.data.tags.get("sweep") == "parent"), key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"]
    assert "1 of 2 jobs failed" in parents[0].data.tags["failure"] and "failure" not in parents[1].data.tags


def test_an_empty_run_file_is_an_error_not_replaced_by_bm25(tmp_path, tiny, env):
    folder = beir(tmp_path / "data")
    (folder / "run.trec").write_text("")
    proc, out = run([*tiny_model(tiny), f"data.local_dir={folder}", "first_stage=run"], env)
    assert_one_line(proc, out, "run.trec holds no ranking line", code=2)
    proc, out = run([*tiny_model(tiny), f"data.local_dir={folder}", "first_stage=auto"], env)
    assert_one_line(proc, out, "run.trec holds no ranking line", code=2)


def test_duplicate_query_ids_are_refused_like_duplicate_document_ids(tmp_path, tiny, env):
    folder = beir(tmp_path / "data")
    with open(folder / "queries.jsonl", "a") as fh:
        fh.write(json.dumps({"_id": "q1", "text": "another text"}) + "\n")
    proc, out = run([*tiny_model(tiny), f"data.local_dir={folder}"], env)
    assert_one_line(proc, out, "queries.jsonl: duplicate query id 'q1'", code=2)


def test_a_model_path_that_does_not_exist_or_is_a_file(tmp_path, tiny, env):
    args = [a for a in tiny_model(tiny) if not a.startswith("model.path=")]
    proc, out = run([*args, f"model.path={tmp_path}/no/such/dir"], env)
    assert_one_line(proc, out, "does not exist", code=2)
    (tmp_path / "weights.bin").write_bytes(b"x")
    proc, out = run([*args, f"model.path={tmp_path}/weights.bin"], env)
    assert_one_line(proc, out, "is a file, not a folder", code=2)


def test_a_same_size_edit_with_its_mtime_restored_is_seen(tmp_path):
    """The content fingerprint is memoised by path, size, mtime, inode and ctime: `touch -r` / `rsync -t` restore the
    mtime of an equal-size edit, not its ctime, so the next process hashes the file again."""
    from corexp import files
    from corexp.data.datasets import file_digest

    path = tmp_path / "test.tsv"
    path.write_text("q1\td1\t1\n")
    before = file_digest(path, memo_dir=tmp_path / "memo")
    st = path.stat()
    path.write_text("q1\td2\t1\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    files._SHA256.clear()  # a new process: only the memo on disk
    assert file_digest(path, memo_dir=tmp_path / "memo") != before


def test_degenerate_attention_scores_fail_the_run(tmp_path, tiny, env):
    """A model whose attention gives every candidate the same score (here: every document text empty) ranks nothing:
    each such query is named, and a run with more than scoring.max_degenerate of them is FAILED, never FINISHED."""
    folder = tmp_path / "data"
    beir(folder)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": ""}) + "\n" for d in ("d1", "d2")))
    store = f"sqlite:///{tmp_path}/m.db"
    proc, out = run([*tiny_model(tiny), f"data.local_dir={folder}", f"tracking.uri={store}", "tracking.experiment=deg"], env)
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "query q1: all 2 scores equal (0), no ranking from the attention" in out
    assert out.splitlines()[-1].startswith("corexp: error: 1 of 1 queries got degenerate attention scores")
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["deg"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"] and "degenerate" in runs[0].data.tags["failure"]


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root, as CI runs): filled, or remounted read-only, by the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_or_read_only_disk_under_the_store_is_one_line(small_disk, tmp_path, tiny, env):
    """An existing store and a new one on a full disk, and a store on a read-only one: the store's path, what is wrong
    and the fix in one line, exit 2, no MLflow traceback (it logs two before raising)."""
    args = [*tiny_model(tiny), f"data.local_dir={beir(tmp_path / 'data')}"]
    first, out = run([*args, f"tracking.uri=sqlite:///{small_disk}/m.db"], env)
    assert first.returncode == 0, out[-3000:]
    with open(small_disk / "fill", "wb") as fh, contextlib.suppress(OSError):  # fill the disk
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    for db in ("m.db", "new.db"):
        proc, out = run([*args, "data.max_queries=2", f"tracking.uri=sqlite:///{small_disk}/{db}"], env)
        assert_one_line(proc, out, f"the MLflow store {small_disk}/{db} cannot be written: the disk is full", code=2)
    (small_disk / "fill").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    proc, out = run([*args, "data.max_queries=2", f"tracking.uri=sqlite:///{small_disk}/m.db"], env)
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "cannot be written: it is read-only" in out.splitlines()[-1] or "not writable" in out.splitlines()[-1], out


def test_ctrl_c_is_an_interruption_not_an_internal_error():
    from corexp.errors import one_line

    assert one_line(KeyboardInterrupt()) == "interrupted (Ctrl-C)"


def test_the_report_clis_fail_in_one_line(tmp_path, env):
    """The report and the studies' CLIs handle errors as the job CLI does: a store file that is not a database, an
    output folder that cannot be created, an absent store; one line each, non-zero exit, no traceback."""
    (tmp_path / "notdb.db").write_text("not a database\n")
    for module in ("corexp.report", "corexp.studies.scaling"):
        proc, out = run(["--tracking-uri", f"sqlite:///{tmp_path}/notdb.db"], env, module=module)
        assert proc.returncode != 0 and "Traceback" not in out and len(out.splitlines()) == 1, out[-3000:]
        assert "is not an SQLite database" in out or "no MLflow store" in out, out
    proc, out = run(["--report", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], env, module="corexp.studies.atlas")
    assert proc.returncode == 2 and out.startswith("corexp.atlas: error:") and len(out.splitlines()) == 1, out


def test_the_report_names_an_output_folder_it_cannot_create(tmp_path, tiny, env):
    store = f"sqlite:///{tmp_path}/m.db"
    proc, out = run([*tiny_model(tiny), f"data.local_dir={beir(tmp_path / 'data')}", f"tracking.uri={store}"], env)
    assert proc.returncode == 0, out[-3000:]
    (tmp_path / "file").write_text("x")
    proc, out = run(["--tracking-uri", store, "--out", f"{tmp_path}/file/sub/report.md"], env, module="corexp.report")
    assert proc.returncode == 1 and "Traceback" not in out and out.splitlines()[-1].startswith("corexp.report: error:"), out
    assert f"{tmp_path}/file" in out.splitlines()[-1], out


@pytest.mark.slow
def test_a_damaged_model_cache_is_converted_again_never_used(tmp_path):
    """4 KiB of random bytes in the middle of the converted SmolLM2 weights (which gave every attention score 0.0 and a
    FINISHED run before): `python -m corexp.verify_cache` names the file and exits 1; the next job converts the model
    again from its pinned GGUF with one line saying so and finishes on intact weights."""
    import shutil
    import sys

    from corexp.engine.models import converted_checkpoint

    from helpers import build_job

    job = build_job(["model=smollm2"])
    folder, sha = converted_checkpoint(job.model, job.paths.cache)  # the suite's shared cache: converted once
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache / "models" / folder.name)
    shutil.copytree(job.paths.cache / "gguf" / sha[:16], cache / "gguf" / sha[:16])
    weights = cache / "models" / folder.name / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(weights.stat().st_size // 2)
        fh.write(os.urandom(4096))
    env = {**os.environ, "COREXP_CACHE": str(cache), "COREXP_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    verify = subprocess.run([sys.executable, "-m", "corexp.verify_cache", "--cache", str(cache)], capture_output=True,
                            text=True, env=env)
    assert verify.returncode == 1 and "model.safetensors is damaged" in verify.stdout, verify.stdout + verify.stderr
    proc = subprocess.run([sys.executable, "-m", "corexp", "heads=random", "heads.k=2", "data.max_queries=1",
                           "progress=false"], capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "model.safetensors is damaged" in out and "converting it again" in out, out[-3000:]
    again = subprocess.run([sys.executable, "-m", "corexp.verify_cache", "--cache", str(cache)], capture_output=True,
                           text=True, env=env)
    assert again.returncode == 0 and again.stdout.strip() == f"{folder.name}: ok", again.stdout


def test_an_offline_hub_cache_without_weights_names_offline_mode_and_the_cache(tmp_path, tiny, env):
    """Only config.json of a Hub model in the cache and HF_HUB_OFFLINE=1: the line says that the weights are missing,
    that offline mode forbids fetching them, and where the cache is."""
    import shutil

    snap = tmp_path / "hf" / "hub" / "models--org--partial" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    shutil.copy(tiny / "config.json", snap / "config.json")
    (tmp_path / "hf" / "hub" / "models--org--partial" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--org--partial" / "refs" / "main").write_text("0" * 40)
    args = ["model.hf_id=org/partial", "model.gguf=null", "model.template=plain", "model.name=partial", "heads=all",
            "data.max_queries=1", "first_stage.depth=2", "progress=false", f"data.local_dir={beir(tmp_path / 'data')}"]
    proc, out = run(args, {**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert_one_line(proc, out, "holds only part of org/partial (no weights)", "HF_HUB_OFFLINE is set",
                    f"{tmp_path / 'hf'}/hub", code=2)


def test_flipped_bytes_in_data_files_or_the_store_end_in_one_line_or_an_honest_rerun(tmp_path_factory, tiny, env):
    """A property over corrupted inputs: a byte of a data file (corpus, queries, qrels, run) or of the MLflow store set to
    a drawn value, then the job run again. Either it stops in one line with a non-zero exit and no traceback, or it
    finishes on the data as it now is (a new content fingerprint, never the old FINISHED result skipped into place)."""
    import shutil

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = tmp_path_factory.mktemp("flip-base")
    beir(base / "data")
    first, out = run([*tiny_model(tiny), f"data.local_dir={base}/data", f"tracking.uri=sqlite:///{base}/m.db",
                      "tracking.experiment=flip"], env)
    assert first.returncode == 0, out[-2000:]

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(target=st.sampled_from(["corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "run.trec", "store"]),
           where=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255))
    def check(target, where, value):
        tmp = tmp_path_factory.mktemp("flip")
        shutil.copytree(base / "data", tmp / "data")
        shutil.copy(base / "m.db", tmp / "m.db")
        folder, store = tmp / "data", f"sqlite:///{tmp}/m.db"
        args = [*tiny_model(tiny), f"data.local_dir={folder}", f"tracking.uri={store}", "tracking.experiment=flip"]
        path = tmp / "m.db" if target == "store" else folder / target
        data = bytearray(path.read_bytes())
        at = int(where * len(data))
        if data[at] == value:
            return
        data[at] = value
        path.write_bytes(bytes(data))
        proc, out = run(args, env)
        if proc.returncode != 0:
            lines = [line for line in out.splitlines() if line.strip()]
            assert "Traceback" not in out and lines[-1].startswith("corexp: error:"), (target, at, value, out[-2000:])
            return
        assert target != "store" or "skipped" in out, (at, value, out[-2000:])  # the store's data survived the flip
        if target != "store":
            mlflow.set_tracking_uri(store)
            prints = {r.data.tags.get("data_fingerprint") for r in mlflow.search_runs(experiment_names=["flip"],
                                                                                     output_format="list")}
            assert "corexp: skipped" not in out and len(prints) == 2, (target, at, value, out[-2000:])

    check()


def test_two_sweeps_at_once_on_one_explicit_folder_both_close_their_parents(tmp_path, tiny, env):
    import sys

    store = f"sqlite:///{tmp_path}/s.db"
    good = beir(tmp_path / "good")
    args = ["-m", *tiny_model(tiny), f"tracking.uri={store}", "tracking.experiment=twice", f"data.local_dir={good}",
            f"hydra.sweep.dir={tmp_path}/shared"]
    procs = [subprocess.Popen([sys.executable, "-m", "corexp", *args, f"data.max_queries={n}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in ("1,2", "1")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    mlflow.set_tracking_uri(store)
    parents = [r for r in mlflow.search_runs(experiment_names=["twice"], output_format="list")
               if r.data.tags.get("sweep") == "parent"]
    assert sorted(p.info.status for p in parents) == ["FINISHED", "FINISHED"], [p.info for p in parents]


def test_the_atlas_builds_into_the_store_it_is_given(monkeypatch):
    """`python -m corexp.studies.atlas --tracking-uri X model=...` logs to X (before: only --report read X)."""
    from corexp.studies import atlas

    seen = []
    monkeypatch.setattr(atlas, "run", lambda overrides, widths, k, experiment, marks: seen.append(overrides))
    assert atlas.main(["model=smollm2", "--tracking-uri", "sqlite:////elsewhere/m.db"]) == 0
    assert seen == [["model=smollm2", "tracking.uri=sqlite:////elsewhere/m.db"]]
