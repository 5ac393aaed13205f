"""Head selection (METHOD.md §4, §6): detection scores -> top-k, random control, published lists; overlap."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from corexp.errors import CorexpError

Head = tuple[int, int]
METRICS = ("all", "core", "qrhead", "random", "published")


def parse_head(label: str) -> Head:
    try:
        layer, head = str(label).split("-")
        return int(layer), int(head)
    except ValueError:
        raise CorexpError(f"head '{label}' is not of the form 'layer-head' (e.g. 15-21)") from None


def format_heads(heads: list[Head]) -> str:
    return ",".join(f"{l}-{h}" for l, h in heads)


def qrhead_scores(masses: np.ndarray, pos_index: np.ndarray) -> np.ndarray:
    """Mean attention mass on the positive. masses: (instances, layers, heads, docs)."""
    idx = pos_index[:, None, None, None]
    return np.take_along_axis(masses, np.broadcast_to(idx, masses.shape[:3] + (1,)), axis=3)[..., 0].mean(axis=0)


def core_scores(masses: np.ndarray, pos_index: np.ndarray, tau: float) -> np.ndarray:
    """Mean softmax probability of the positive among positive + negatives, temperature tau (stable log-sum-exp)."""
    if not tau or tau <= 0 or not np.isfinite(tau):
        raise CorexpError(f"heads.tau must be a positive finite number, got {tau}")
    z = masses.astype(np.float64) / tau
    z -= z.max(axis=3, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=3, keepdims=True))
    idx = np.broadcast_to(pos_index[:, None, None, None], masses.shape[:3] + (1,))
    return np.exp(np.take_along_axis(logp, idx, axis=3)[..., 0]).mean(axis=0)


def top_k(scores: np.ndarray, k: int, max_layer: int | None = None) -> list[Head]:
    """The k best heads (ties: lower layer, then lower head), optionally only among layers < max_layer."""
    n_layers, n_heads = scores.shape
    allowed = n_layers if max_layer is None else min(max_layer, n_layers)
    cands = [(float(scores[l, h]), l, h) for l in range(allowed) for h in range(n_heads)]
    check_k(k, len(cands))
    cands.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [(l, h) for _, l, h in cands[:k]]


def check_k(k: int, available: int) -> None:
    if k < 1 or k > available:
        raise CorexpError(f"heads.k={k} is out of range: choose 1..{available} (heads available)")


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    check_k(k, n_layers * n_heads)
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    return sorted(random.Random(seed).sample(pool, k))


def published_heads(model_cfg: Any, k: int, metric: str = "core") -> list[Head]:
    lists = model_cfg.get("published_heads") or {}
    key = metric if metric in lists else next(iter(lists), None)
    if key is None:
        raise CorexpError(f"model '{model_cfg.name}' has no published head list; use heads.metric=core or qrhead")
    heads = [parse_head(x) for x in lists[key]]
    check_k(k, len(heads))
    return heads[:k]


def jaccard(a: list[Head], b: list[Head]) -> float:
    sa, sb = set(map(tuple, a)), set(map(tuple, b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def layer_stats(heads: list[Head], n_layers: int) -> dict[str, float]:
    """Where the selected heads sit: mean/min/max layer and the share in each third of the depth."""
    if not heads:
        return {}
    layers = np.array([l for l, _ in heads], dtype=float)
    thirds = np.floor(layers * 3 / n_layers).clip(0, 2)
    return {
        "layer_mean": float(layers.mean()), "layer_min": float(layers.min()), "layer_max": float(layers.max()),
        "share_lower_third": float((thirds == 0).mean()), "share_middle_third": float((thirds == 1).mean()),
        "share_upper_third": float((thirds == 2).mean()),
    }
