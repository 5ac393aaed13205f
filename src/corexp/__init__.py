"""corexp: attention-based LLM re-ranking experiments (CoRe heads, QRHead, ICR)."""

from __future__ import annotations

from typing import Any

from corexp.errors import CorexpError

__version__ = "0.1.0"
__all__ = ["CorexpError", "__version__", "build_reranker"]


def __getattr__(name: str) -> Any:
    """`from corexp import build_reranker` without importing torch for `import corexp`."""
    if name == "build_reranker":
        from corexp.api import build_reranker

        return build_reranker
    raise AttributeError(name)
