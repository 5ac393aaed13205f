import json
import shutil
import zipfile

import pytest

from corexp.config import RESOURCES_DIR
from corexp.data.datasets import load_local, read_trec_run
from corexp.errors import CorexpError

from helpers import build_job


def test_shared_scifact_local_folder(shared_data):
    ds = load_local(shared_data / "scifact", "test", "scifact")
    assert len(ds.queries) == 300 and sum(len(v) for v in ds.qrels.values()) == 339
    assert len(ds.docs) == 5183 and len(ds.run) == 300


def test_embedded_sample_is_small_real_and_licensed():
    folder = RESOURCES_DIR / "scifact_sample"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 3 * 2**20
    assert "CC BY 4.0" in (folder / "LICENSE.txt").read_text()
    test, train = load_local(folder, "test", "s"), load_local(folder, "train", "s")
    assert len(test.queries) == 50 and len(train.queries) == 100
    assert not set(test.queries) & set(train.queries)
    for ds in (test, train):
        cands = {d for q in ds.queries for d, _ in ds.run[q]}
        assert cands <= {d.id for d in ds.docs.iter_docs()}


def test_embedded_sample_matches_shared_data(shared_data):
    full = load_local(shared_data / "scifact", "test", "scifact")
    sample = load_local(RESOURCES_DIR / "scifact_sample", "test", "s")
    for q in sample.queries:
        assert sample.queries[q] == full.queries[q] and sample.qrels[q] == full.qrels[q]
        assert [d for d, _ in sample.run[q]] == [d for d, _ in full.run[q][:20]]


def _beir_folder(tmp_path, corpus_lines, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n"):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "query"}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text(qrels)
    return tmp_path


def test_malformed_jsonl_names_file_and_line(tmp_path):
    folder = _beir_folder(tmp_path, [json.dumps({"_id": "d1", "text": "x"}), "{not json"])
    with pytest.raises(CorexpError, match=r"corpus.jsonl:2: malformed JSON"):
        load_local(folder, "test", "t")


def test_duplicate_ids_and_missing_files(tmp_path):
    folder = _beir_folder(tmp_path, [json.dumps({"_id": "d1", "text": "x"})] * 2)
    with pytest.raises(CorexpError, match="duplicate document id 'd1'"):
        load_local(folder, "test", "t")
    with pytest.raises(CorexpError, match="missing qrels/dev.tsv"):
        load_local(folder, "dev", "t")


def test_malformed_trec_run(tmp_path):
    (tmp_path / "r.trec").write_text("q1 Q0 d1 1 2.0 tag\nq1 Q0 d2 x\n")
    with pytest.raises(CorexpError, match=r"r.trec:2: malformed TREC run"):
        read_trec_run(tmp_path / "r.trec")


@pytest.fixture()
def irds_home(tmp_path, shared_data, monkeypatch):
    """A pre-populated ir_datasets home built from ../shared/data (as its README describes); no network."""
    home = tmp_path / "irds"
    sci = home / "beir" / "scifact"
    sci.mkdir(parents=True)
    with zipfile.ZipFile(sci / "source.zip", "w") as zf:
        for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv"):
            zf.write(shared_data / "scifact" / name, f"scifact/{name}")
    msm = home / "msmarco-passage"
    (msm / "trec-dl-2019").mkdir(parents=True)
    (msm / "irds_version.txt").write_text("v2")
    with open(msm / "collection.tsv", "w") as out:
        for line in (shared_data / "dl19" / "corpus.jsonl").read_text().splitlines(keepends=True):
            d = json.loads(line)
            out.write(f"{d['_id']}\t{d['text']}\n")
    with open(msm / "trec-dl-2019" / "queries.tsv", "w") as out:
        for line in (shared_data / "dl19" / "queries.jsonl").read_text().splitlines(keepends=True):
            q = json.loads(line)
            out.write(f"{q['_id']}\t{q['text']}\n")
    shutil.copy(shared_data / "dl19" / "qrels" / "qrels.dl19-passage.txt", msm / "trec-dl-2019" / "qrels")
    with open(msm / "trec-dl-2019" / "ms.run", "w") as out:
        for line in (shared_data / "dl19" / "run.bm25.trec").read_text().splitlines(keepends=True):
            p = line.split()
            out.write(f"{p[0]}\t{p[2]}\n")
    monkeypatch.setenv("IR_DATASETS_HOME", str(home))
    return home


def test_ir_datasets_loads_offline_from_shared_files(irds_home):
    import subprocess
    import sys

    code = (
        "import ir_datasets as i\n"
        "s=i.load('beir/scifact/test'); d=i.load('msmarco-passage/trec-dl-2019/judged')\n"
        "print(len(list(s.queries_iter())), len(list(s.qrels_iter())), len(list(d.queries_iter())), len(list(d.qrels_iter())))\n"
        "print(s.docs_store().get('4983').title[:20])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "IR_DATASETS_HOME": str(irds_home)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "300 339 43 9260"
    assert out.stdout.split("\n")[1] == "Microstructural deve"


def test_corexp_irds_source_reads_the_same_queries(irds_home):
    ds = build_job(["data=dl19"]).data.load()
    assert len(ds.queries) == 43 and sum(len(v) for v in ds.qrels.values()) == 9260
    assert ds.run is not None and len(ds.run) == 43
    first = next(iter(ds.run.values()))[0][0]
    assert ds.docs.get_many([first])[first].text


def test_an_ir_datasets_download_that_cannot_reach_its_host_is_one_line(monkeypatch):
    """Offline (this machine, a cluster node without internet), ir_datasets' download fails deep inside requests: the
    job ends in one line naming the data set and the local_dir way around, not an internal error."""
    import ir_datasets
    import requests

    from corexp.data.datasets import DataSource
    from corexp.errors import CorexpError, one_line

    class Offline:
        def has_qrels(self):
            return True

        def has_queries(self):
            return True

        def queries_iter(self):
            raise requests.exceptions.ConnectionError("Failed to resolve 'public.ukp.informatik.tu-darmstadt.de'")

    monkeypatch.setattr(ir_datasets, "load", lambda irds_id: Offline())
    with pytest.raises(CorexpError) as err:
        DataSource(name="scifact", irds_id="beir/scifact/test").load()
    line = one_line(err.value)
    assert line.startswith("'scifact' (ir_datasets 'beir/scifact/test') could not be downloaded: its host cannot be "
                           "reached (offline?) (ConnectionError)") and "data.local_dir" in line and "\n" not in line
