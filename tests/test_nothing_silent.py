"""Nothing silent (issue: verified caches, degenerate scores, reused sweep folders, content fingerprints, user files):
each case ends in one line and a non-zero exit, or in the right result, never in a FINISHED run with a wrong one."""

import json
import os
import shutil

import mlflow

from test_cli_errors import assert_one_line, beir, env, run, tiny, tiny_model  # noqa: F401 - fixtures


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
