import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "scifact" / "corpus.jsonl").is_file():
        pytest.skip("../shared/data not present")
    return SHARED


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random-weight Llama checkpoint folder (tests/tiny_models.py), one per test module."""
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a CLI job with its own project root and cache, the Hub offline."""
    root = tmp_path_factory.mktemp("root")
    return {**os.environ, "COREXP_ROOT": str(root), "COREXP_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
