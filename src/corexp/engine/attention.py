"""Attention read-out (METHOD.md §2): fp32 attention rows of the query span, for the requested heads only.

A custom attention function registered with transformers' AttentionInterface receives every layer's post-RoPE
query and key states. It runs the model's normal SDPA attention for the hidden states and, for requested layers,
computes softmax(s * q_t k_j + mask) only for rows t of the query span: never an n x n matrix and never
`output_attentions`. Key columns map to absolute positions from the cache length, so sliding-window caches work.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTN_IMPLEMENTATION = "corexp_readout"


class Readout:
    """Per layer, the mean over query-span rows of the attention probabilities of selected heads.

    heads: layer -> head indices (None: every head of every layer).
    rows: [start, end) of the query span, relative to the tokens of the current forward call.
    past_len: tokens already in the KV cache before this call (absolute position of the call's first token).
    """

    def __init__(self, heads: dict[int, list[int]] | None, rows: tuple[int, int], past_len: int = 0):
        self.heads = heads
        self.rows = rows
        self.past_len = past_len
        self.layers: dict[int, torch.Tensor] = {}  # layer -> (n_heads_sel, total_len) fp32
        self.labels: dict[int, list[int]] = {}  # layer -> head indices of the rows in self.layers[layer]
        self._index_cache: dict[tuple[int, int, str], tuple[list[int], torch.Tensor, torch.Tensor]] = {}

    def wants(self, layer: int) -> bool:
        return self.heads is None or layer in self.heads

    def head_index(self, layer: int, n_heads: int, n_rep: int, device: torch.device):
        """Selected heads as a Python list (labels: no device sync) and as index tensors (query heads, their KV heads)."""
        key = (layer, n_heads, str(device))
        if key not in self._index_cache:
            sel = list(range(n_heads)) if self.heads is None else list(self.heads[layer])
            self._index_cache[key] = (sel, torch.tensor(sel, dtype=torch.long, device=device),
                                      torch.tensor([h // n_rep for h in sel], dtype=torch.long, device=device))
        return self._index_cache[key]

    def capture(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float,
                sliding_window: int | None = None, softcap: float | None = None) -> None:
        n_heads, n_new = query.shape[1], query.shape[2]
        n_kv, s_l = key.shape[1], key.shape[2]
        n_rep = n_heads // n_kv
        sel, q_idx, kv_idx = self.head_index(layer, n_heads, n_rep, query.device)
        r0, r1 = self.rows
        if self.heads is None:  # every head: group the query heads by their KV head instead of copying keys per head
            q = query[0, :, r0:r1].float().reshape(n_kv, n_rep * (r1 - r0), -1)  # heads of one KV head share it
            scores = torch.bmm(q, key[0].float().transpose(-1, -2)).view(n_heads, r1 - r0, s_l)
        else:
            q = query[0].index_select(0, q_idx)[:, r0:r1].float()  # (h, |Q|, d)
            k = key[0].index_select(0, kv_idx).float()  # (h, S_l, d)
            scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        total = self.past_len + n_new
        first = total - s_l  # absolute position of the first key column
        q_lo, q_hi = self.past_len + r0, self.past_len + r1  # absolute positions of the rows: [q_lo, q_hi)
        # Causal: only columns after the first row can be masked; with a sliding window, also the oldest ones.
        q_pos = torch.arange(q_lo, q_hi, device=q.device)[:, None]
        lo = max(0, q_lo + 1 - first)
        if lo < s_l:
            k_pos = torch.arange(first + lo, total, device=q.device)
            scores[..., lo:].masked_fill_(k_pos[None, :] > q_pos, float("-inf"))
        if sliding_window and q_hi - 1 - sliding_window >= first:
            hi = min(s_l, q_hi - sliding_window - first)  # columns [0, hi) can be outside some row's window
            k_pos = torch.arange(first, first + hi, device=q.device)
            scores[..., :hi].masked_fill_(k_pos[None, :] <= q_pos - sliding_window, float("-inf"))
        probs = torch.softmax(scores, dim=-1).mean(dim=1)  # (h, S_l)
        if s_l < total:
            probs = torch.nn.functional.pad(probs, (total - s_l, 0))
        self.layers[layer] = probs
        self.labels[layer] = sel

    def head_matrix(self) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """(layer, head) labels and a (n_heads_total, total_len) matrix of mean attention rows."""
        labels, rows = [], []
        for layer in sorted(self.layers):
            labels += [(layer, h) for h in self.labels[layer]]
            rows.append(self.layers[layer])
        return labels, torch.cat(rows, dim=0)


_ACTIVE: contextvars.ContextVar[Readout | None] = contextvars.ContextVar("corexp_readout", default=None)


@dataclass
class TreePass:
    """One forward over [prefix | real query | N/A query] (METHOD.md §3 in one pass).

    Tokens [0, q_start) are the documents; [q_start, q_end) the real query; [q_end, n) the N/A query, whose position
    ids continue from q_start. In every layer the real query attends causally to the documents and itself, the N/A
    query to the documents and itself only: exactly what a separate N/A pass over the cached documents computes. The
    attention function runs it as two SDPA calls (the causal main part keeps the fused causal kernel; the short N/A
    part gets a small (n_na x (q_start + n_na)) mask), so no n x n mask is ever built; sliding windows apply by position.
    """

    q_start: int
    q_end: int
    real: Readout
    na: Readout


_TREE: contextvars.ContextVar[TreePass | None] = contextvars.ContextVar("corexp_tree", default=None)


@contextlib.contextmanager
def tree_pass(tree: TreePass) -> Iterator[TreePass]:
    token = _TREE.set(tree)
    try:
        yield tree
    finally:
        _TREE.reset(token)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, causal_by: torch.Tensor | None = None):
    """(1, 1, |q|, |k|) boolean mask, True = attend: key position <= query position, inside the sliding window."""
    ok = k_pos[None, :] <= q_pos[:, None] if causal_by is None else causal_by
    if window:
        ok = ok & (q_pos[:, None] - k_pos[None, :] < window)
    return ok[None, None]


def tree_attention(module, query, key, value, tree: TreePass, scaling: float | None, **kwargs):
    qs, qe = tree.q_start, tree.q_end
    n_na = query.shape[2] - qe
    layer = getattr(module, "layer_idx", None)
    window = kwargs.get("sliding_window")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k_na = torch.cat([key[:, :, :qs], key[:, :, qe:]], dim=2)
    v_na = torch.cat([value[:, :, :qs], value[:, :, qe:]], dim=2)
    if layer is not None and tree.real.wants(layer):
        tree.real.capture(layer, query[:, :, :qe], key[:, :, :qe], scale, window, kwargs.get("softcap"))
        tree.na.capture(layer, query[:, :, qe:], k_na, scale, window, kwargs.get("softcap"))
    dev = query.device
    main_mask = None
    if window and qe > window:
        pos = torch.arange(qe, device=dev)
        main_mask = _window_mask(pos, pos, window)
    na_q = torch.arange(qs, qs + n_na, device=dev)
    na_k = torch.cat([torch.arange(qs, device=dev), na_q])
    causal = torch.ones((n_na, qs + n_na), dtype=torch.bool, device=dev)
    causal[:, qs:] = torch.tril(torch.ones((n_na, n_na), dtype=torch.bool, device=dev))
    na_mask = _window_mask(na_q, na_k, window, causal_by=causal)
    kw = {k: v for k, v in kwargs.items() if k not in ("is_causal",)}
    main, _ = sdpa_attention_forward(module, query[:, :, :qe], key[:, :, :qe], value[:, :, :qe], main_mask,
                                     scaling=scaling, is_causal=main_mask is None, **kw)
    na, _ = sdpa_attention_forward(module, query[:, :, qe:], k_na, v_na, na_mask, scaling=scaling, is_causal=False, **kw)
    return torch.cat([main, na], dim=1), None


@contextlib.contextmanager
def recording(readout: Readout | None) -> Iterator[Readout | None]:
    token = _ACTIVE.set(readout)
    try:
        yield readout
    finally:
        _ACTIVE.reset(token)


def readout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """SDPA attention for the model's output, plus the query-span read-out when a Readout is active."""
    tree = _TREE.get()
    if tree is not None:
        return tree_attention(module, query, key, value, tree, scaling, **kwargs)
    rec = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if rec is not None and layer is not None and rec.wants(layer):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        rec.capture(layer, query, key, scale, kwargs.get("sliding_window"), kwargs.get("softcap"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    """Make `attn_implementation="corexp_readout"` available to every transformers model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, readout_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


register()
