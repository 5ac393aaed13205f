"""The Python API: a re-ranker from the packaged configs, built at the door exactly as a job builds its own.

    from corexp import build_reranker
    rr = build_reranker("smollm2")                                  # ICR: every head
    rr = build_reranker("smollm2", heads=[(12, 3), (14, 0)])        # a head list (layers above 14 are not loaded)
    rr = build_reranker("smollm2", heads="core")                    # CoRe heads detected as a job would (cached)
    ranking = rr.rerank("what causes scurvy?", ["Scurvy is caused by ...", "..."])   # a Ranking: ids, scores, top(k)
"""

from __future__ import annotations

import dataclasses

from corexp.components.heads import Head
from corexp.components.truncation import AutoTruncation
from corexp.config import compose_config
from corexp.engine.reranker import AttentionReranker
from corexp.job import Job


def job_for(model: str = "smollm2", heads: str | list[Head] | None = None, prompt: str = "core",
            overrides: list[str] | None = None) -> Job:
    """The Job of the CLI for these choices (validated; nothing loaded). heads: a `heads` option name, or None / a list
    (then the given heads, with the layers above the deepest one not loaded)."""
    option = heads if isinstance(heads, str) else "all"
    job = Job.from_config(compose_config([f"model={model}", f"prompt={prompt}", f"heads={option}", *(overrides or [])]))
    chosen = [o.lstrip("+~") for o in overrides or [] if o.lstrip("+~").startswith("truncation")]
    if isinstance(heads, (list, tuple)) and chosen in ([], ["truncation=auto"]):  # ICR's job resolves auto to none
        job = dataclasses.replace(job, truncation=AutoTruncation())  # given heads: nothing above the deepest is loaded
    return job


def build_reranker(model: str = "smollm2", heads: str | list[Head] | None = None, prompt: str = "core",
                   overrides: list[str] | None = None) -> AttentionReranker:
    """An AttentionReranker: heads None (ICR, every head), a list of (layer, head), or a `heads` option ("core",
    "qrhead", "random", "window", ...) selected as a job selects it (detection data from the config, cached)."""
    from corexp.pipeline.run import build_reranker as build

    job = job_for(model, heads, prompt, overrides)
    rr, _ = build(job, heads=None if isinstance(heads, str) or heads is None else list(heads))
    return rr
