"""Nothing silent (issue: verified caches, degenerate scores, reused sweep folders, content fingerprints, user files):
each case ends in one line and a non-zero exit, or in the right result, never in a FINISHED run with a wrong one."""

import contextlib
import json
import os
import subprocess

import mlflow
import pytest
from test_cli_errors import assert_one_line, beir, run, tiny_model

from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    return {**os.environ, "COREXP_ROOT": str(root), "COREXP_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}


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
