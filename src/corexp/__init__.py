"""corexp: attention-based LLM re-ranking experiments (CoRe heads, QRHead, ICR)."""

__version__ = "0.1.0"

from corexp.errors import CorexpError

__all__ = ["CorexpError", "__version__"]
