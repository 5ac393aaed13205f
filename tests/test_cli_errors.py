"""What a user sees when a command fails: one line naming the file, line or setting and the fix, a non-zero exit, no
traceback (at most 4 lines of output in all), through the real CLI (`python -m corexp`, `python -m corexp.report.tables`).
`debug=true` keeps the traceback."""

import gzip
import json
import shutil
import subprocess
import sys


def tiny_model(tiny):
    return [f"model.path={tiny}", "model.gguf=null", "model.template=plain", "model.name=tiny", "heads=all",
            "data.max_queries=1", "first_stage.depth=2", "progress=false"]


def run(args, env, module="corexp", timeout=300):
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout)
    return proc, (proc.stdout + proc.stderr).strip()


def assert_one_line(proc, out, *fragments, code=None):
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode != 0, out[-3000:]
    assert code is None or proc.returncode == code, (proc.returncode, out[-3000:])
    assert "Traceback" not in out and len(lines) <= 4, out[-3000:]
    error = next(line for line in lines if line.startswith(("corexp: error:", "corexp.report: error:")))
    for fragment in fragments:
        assert fragment in error, error


def beir(folder, corpus_bytes=None, gz=False):
    """A 2-document BEIR folder (corpus.jsonl or corpus.jsonl.gz, raw bytes allowed) with a run."""
    (folder / "qrels").mkdir(parents=True)
    good = (json.dumps({"_id": "d1", "text": "scurvy vitamin c"}) + "\n" + json.dumps({"_id": "d2", "text": "iron"}) + "\n")
    data = corpus_bytes if corpus_bytes is not None else good.encode()
    name = "corpus.jsonl.gz" if gz else "corpus.jsonl"
    (folder / name).write_bytes(gzip.compress(data) if gz and corpus_bytes is None else data)
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what causes scurvy"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (folder / "run.trec").write_text("q1 Q0 d1 1 2.0 bm25\nq1 Q0 d2 2 1.0 bm25\n")
    return folder


def corrupt_folders(tmp_path):
    good = (json.dumps({"_id": "d1", "text": "a"}) + "\n" + json.dumps({"_id": "d2", "text": "b"}) + "\n").encode()
    cut = gzip.compress(good * 200)
    return {
        "truncated gzip": (beir(tmp_path / "cut", cut[: len(cut) // 2], gz=True), "the gzip stream ends early"),
        "not gzip": (beir(tmp_path / "plain", good, gz=True), "not a gzip file"),
        "invalid UTF-8": (beir(tmp_path / "utf", good + b'{"_id": "d3", "text": "caf\xe9"}\n'), "not UTF-8 text"),
    }


def test_damaged_data_files(tmp_path, tiny, env):
    for folder, fragment in corrupt_folders(tmp_path).values():
        proc, out = run([*tiny_model(tiny), f"data.local_dir={folder}"], env)
        assert_one_line(proc, out, fragment, str(folder / "corpus.jsonl"), code=2)


def test_models_without_weights_or_with_damaged_weights(tmp_path, tiny, env):
    empty = tmp_path / "noweights"
    shutil.copytree(tiny, empty)
    (empty / "model.safetensors").unlink()
    proc, out = run([*tiny_model(tiny), f"model.path={empty}"], env)
    assert_one_line(proc, out, "has no weights", "model.path", code=2)
    for name, cut in (("halved", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"garbage" * 10)):
        damaged = tmp_path / name
        shutil.copytree(tiny, damaged)
        weights = damaged / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
        proc, out = run([*tiny_model(tiny), f"model.path={damaged}"], env)
        assert_one_line(proc, out, "damaged", code=2)


def test_config_mistakes_are_corexps_one_line_with_the_valid_choices(env):
    cases = {
        ("model=nope",): "model=nope is not an option; choose one of gemma3,",
        ("model=_base",): "model=_base is not an option",
        ("model=schema_model",): "model=schema_model is not an option",
        ("data.max_querie=1",): "data.max_querie is not a setting (did you mean data.max_queries?); data settings:",
        ("+data.max_querie=1",): "data.max_querie is not a setting (did you mean data.max_queries?)",
        ("forc=true",): "forc is not a setting (did you mean force?)",
        ("heads.kk=2",): "heads.kk is not a setting of any heads option",
    }
    for args, fragment in cases.items():
        proc, out = run(list(args), env)
        assert_one_line(proc, out, fragment, code=2)
        assert "_base" not in out.split("choose one of")[-1] and "schema_model" not in out.split("choose one of")[-1]


def test_a_store_folder_that_cannot_be_created(tmp_path, tiny, env):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc, out = run([*tiny_model(tiny), f"tracking.uri=sqlite:///{blocker}/sub/mlflow.db"], env)
    assert_one_line(proc, out, "cannot create the store's folder", code=2)


def test_a_sweep_over_a_bad_and_a_corrupt_folder_prints_both_and_closes_its_parent(tmp_path, tiny, env):
    import mlflow

    cut = corrupt_folders(tmp_path)["truncated gzip"][0]
    store = f"sqlite:///{tmp_path}/sweep.db"
    proc, out = run(["-m", *tiny_model(tiny), f"data.local_dir={tmp_path}/nowhere,{cut}", f"tracking.uri={store}",
                     "tracking.experiment=sweepfail"], env)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("corexp: error:")]
    assert any("does not exist" in e for e in errors) and any("the gzip stream ends early" in e for e in errors), out
    assert errors[-1].startswith("corexp: error: 2 of 2 jobs of the sweep failed")
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["sweepfail"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED" and "2 of 2 jobs failed" in parent[0].data.tags["failure"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert children and all(r.info.status == "FAILED" and r.data.tags.get("failure") for r in children)


def test_debug_true_keeps_the_traceback(tmp_path, tiny, env):
    folder = corrupt_folders(tmp_path)["not gzip"][0]
    proc, out = run([*tiny_model(tiny), f"data.local_dir={folder}", "debug=true"], env)
    assert proc.returncode != 0 and "Traceback" in out
