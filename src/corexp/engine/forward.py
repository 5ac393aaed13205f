"""How a prompt's attention is read (METHOD.md §2-3): the forward strategies of the re-ranker, chosen once when it is
built, and the clock that times their passes.

Every strategy returns s_j(q) of the real query over the document tokens j < q_start and, when the scoring calibrates,
s_j("N/A") of the content-free query; the re-ranker takes their difference (c_j) or s_j(q) alone. All give the same
scores (tests/test_reranker.py):

- `TreeForward` (default): [documents | query | N/A query] in one forward, the N/A rows kept apart from the real query
  by the attention function (attention.TreePass).
- `CutBackCache` (full-attention models): documents + query, the cache cut back to the documents, the N/A query on top.
- `CopiedCache` (sliding-window caches cannot be cut back): the documents alone, their cache copied, query and N/A
  query each on a copy.
- `TableForward` (`readout_cache=true`): every head's real and N/A rows of the prompt, read once (one tree forward)
  and kept in the read-out cache; any head set, calibrated or not, is scored from the table.

When the N/A prompt does not share the documents' tokens with the real prompt (a tokenizer that merges across the
query boundary), each strategy reads the N/A prompt in a forward of its own.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from corexp.engine.attention import Readout, TreePass, recording, tree_pass
from corexp.engine.prompt import EncodedPrompt
from corexp.engine.readout_cache import HeadTable, ReadoutCache

log = logging.getLogger(__name__)

Heads = dict[int, list[int]] | None  # layer -> head indices; None: every head


def heads_by_layer(heads: list[tuple[int, int]] | None) -> Heads:
    if heads is None:
        return None
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return {k: sorted(set(v)) for k, v in out.items()}


def shares_prefix(enc: EncodedPrompt, na: EncodedPrompt) -> bool:
    """The N/A prompt has the real prompt's tokens up to the query (the documents): one forward can serve both."""
    return na.q_start == enc.q_start and torch.equal(na.input_ids[0, :enc.q_start], enc.input_ids[0, :enc.q_start])


class Clock:
    """Tokens and time of each forward into the query's stats: CUDA events on a GPU (no synchronize: the CPU runs
    ahead while the GPU works; read out when the clock closes, after the scores synced), wall time on a CPU. A context
    manager: leaving it records the GPU times."""

    def __init__(self, device: torch.device, stats: Any):
        self.cuda = device.type == "cuda"
        self.stats = stats
        self.events: list[Any] = []

    def __enter__(self) -> Clock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stats.pass_seconds += [a.elapsed_time(b) / 1000 for a, b in self.events]
        self.events = []

    @contextlib.contextmanager
    def timed(self, tokens: int):
        t0 = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            t0.record()
        yield
        self.stats.pass_tokens.append(tokens)
        if self.cuda:
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            self.events.append((t0, t1))
        else:
            self.stats.pass_seconds.append(time.perf_counter() - t0)


# -- passes -------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def run(lm: Any, ids: torch.Tensor, start: int, end: int, cache: Any, rec: Readout | None, clock: Clock):
    """Tokens [start, end) of `ids` on top of `cache` (None: from scratch); the read-out records if given."""
    with clock.timed(end - start), recording(rec):
        out = lm.model(ids[:, start:end].to(lm.device), cache=cache, use_cache=True)
    return out.cache


@torch.inference_mode()
def tree_forward(lm: Any, enc: EncodedPrompt, na: EncodedPrompt, tree: TreePass, clock: Clock) -> None:
    """One forward over [documents | real query | N/A query], the N/A position ids continuing after the documents."""
    n_na = na.q_end - na.q_start
    ids = torch.cat([enc.input_ids[:, :enc.q_end], na.input_ids[:, na.q_start:na.q_end]], dim=1).to(lm.device)
    pos = torch.cat([torch.arange(enc.q_end), torch.arange(enc.q_start, enc.q_start + n_na)])[None].to(lm.device)
    # A placeholder 4-D mask: models return a prepared mask as-is instead of building an n x n one; the attention
    # function applies the tree's own masks.
    placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=lm.device)
    with clock.timed(int(ids.shape[1])), tree_pass(tree):
        lm.model(ids, position_ids=pos, attention_mask=placeholder, use_cache=False)


def token_sum(rec: Readout, length: int) -> torch.Tensor:
    """s_j summed over the recorded heads, for the first `length` tokens."""
    total = None
    for layer in sorted(rec.layers):
        s = rec.layers[layer].sum(dim=0)
        total = s if total is None else total + s
    return total[:length].float().cpu()


def real_only(lm: Any, enc: EncodedPrompt, heads: Heads, clock: Clock) -> Readout:
    """Documents + query, the query rows recorded: s_j(q) without any N/A query."""
    rec = Readout(heads, rows=(enc.q_start, enc.q_end), past_len=0)
    run(lm, enc.input_ids, 0, enc.q_end, None, rec, clock)
    return rec


def separate(lm: Any, enc: EncodedPrompt, na: EncodedPrompt, heads: Heads, clock: Clock) -> tuple[Readout, Readout]:
    """The real and the N/A prompt each in a forward of its own (the N/A prompt does not share the documents' tokens)."""
    log.warning("N/A prompt does not share the prefix tokens; running a full calibration pass")
    na_rec = Readout(heads, rows=(na.q_start, na.q_end), past_len=0)
    real_rec = real_only(lm, enc, heads, clock)
    run(lm, na.input_ids, 0, na.q_end, None, na_rec, clock)
    return real_rec, na_rec


def na_on_documents(lm: Any, na: EncodedPrompt, cache: Any, heads: Heads, clock: Clock) -> Readout:
    """The N/A query run on top of a cache that holds the documents alone, its rows recorded."""
    na_rec = Readout(heads, rows=(0, na.q_end - na.q_start), past_len=na.q_start)
    run(lm, na.input_ids, na.q_start, na.q_end, cache, na_rec, clock)
    return na_rec


def tree_readouts(lm: Any, enc: EncodedPrompt, na: EncodedPrompt, heads: Heads, clock: Clock) -> tuple[Readout, Readout]:
    if not shares_prefix(enc, na):
        return separate(lm, enc, na, heads, clock)
    real_rec = Readout(heads, rows=(enc.q_start, enc.q_end), past_len=0)
    na_rec = Readout(heads, rows=(0, na.q_end - na.q_start), past_len=enc.q_start)
    tree_forward(lm, enc, na, TreePass(enc.q_start, enc.q_end, real_rec, na_rec), clock)
    return real_rec, na_rec


# -- strategies ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassForward:
    """A strategy that runs the model for the head set it is asked (the others read the table)."""

    name = "passes"

    def readouts(self, lm: Any, enc: EncodedPrompt, na: EncodedPrompt, heads: Heads, clock: Clock) -> tuple[Readout, Readout]:
        raise NotImplementedError

    def token_scores(self, lm: Any, enc: EncodedPrompt, na: EncodedPrompt | None, heads: list[tuple[int, int]] | None,
                     calibrate: bool, clock: Clock, stats: Any) -> torch.Tensor:
        """c_j = s_j(q) - s_j("N/A") over the document tokens; calibrate=False: s_j(q) alone (no N/A query runs)."""
        by_layer = heads_by_layer(heads)
        if not calibrate:
            return token_sum(real_only(lm, enc, by_layer, clock), enc.q_start)
        real_rec, na_rec = self.readouts(lm, enc, na, by_layer, clock)
        return token_sum(real_rec, enc.q_start) - token_sum(na_rec, enc.q_start)


@dataclass(frozen=True)
class TreeForward(PassForward):
    name = "tree"

    def readouts(self, lm, enc, na, heads, clock):
        return tree_readouts(lm, enc, na, heads, clock)


@dataclass(frozen=True)
class CutBackCache(PassForward):
    name = "cut-back cache"

    def readouts(self, lm, enc, na, heads, clock):
        if not shares_prefix(enc, na):
            return separate(lm, enc, na, heads, clock)
        real_rec = Readout(heads, rows=(enc.q_start, enc.q_end), past_len=0)
        cache = run(lm, enc.input_ids, 0, enc.q_end, None, real_rec, clock)
        cache.crop(enc.q_start - enc.q_end)  # negative: drop the query tokens
        return real_rec, na_on_documents(lm, na, cache, heads, clock)


@dataclass(frozen=True)
class CopiedCache(PassForward):
    name = "copied cache"

    def readouts(self, lm, enc, na, heads, clock):
        if not shares_prefix(enc, na):
            return separate(lm, enc, na, heads, clock)
        real_rec = Readout(heads, rows=(0, enc.q_end - enc.q_start), past_len=enc.q_start)
        prefix = run(lm, enc.input_ids, 0, enc.q_start, None, None, clock)
        cache = copy.deepcopy(prefix)
        run(lm, enc.input_ids, enc.q_start, enc.q_end, prefix, real_rec, clock)
        return real_rec, na_on_documents(lm, na, cache, heads, clock)


def read_table(lm: Any, enc: EncodedPrompt, na: EncodedPrompt, clock: Clock) -> HeadTable:
    """Every head's s_j of the real and the N/A query over the document tokens j < q_start (one tree forward when the
    N/A prompt shares the documents' tokens)."""
    real_rec, na_rec = tree_readouts(lm, enc, na, None, clock)
    labels, real = real_rec.head_matrix()
    _, calib = na_rec.head_matrix()
    n = enc.q_start
    calib = torch.nn.functional.pad(calib[:, :n], (0, max(0, n - calib.shape[1])))
    return HeadTable(labels, real[:, :n].float().cpu(), calib.float().cpu())


@dataclass(frozen=True)
class TableForward:
    """Every head's rows of each prompt, from the read-out cache or read once (one forward) and stored."""

    cache: ReadoutCache
    name = "read-out table"

    def table(self, lm: Any, enc: EncodedPrompt, na: EncodedPrompt, heads: list[tuple[int, int]] | None, clock: Clock,
              stats: Any) -> HeadTable:
        key = self.cache.key(enc.input_ids[0, :enc.q_end], na.input_ids[0, na.q_start:na.q_end], enc.q_start)
        table = self.cache.load(key)
        if table is not None and table.covers(heads, lm.kept_layers):
            self.cache.hits += 1
            stats.cached = True
            return table
        table = read_table(lm, enc, na, clock)
        self.cache.store(key, table)
        return table

    def token_scores(self, lm: Any, enc: EncodedPrompt, na: EncodedPrompt | None, heads: list[tuple[int, int]] | None,
                     calibrate: bool, clock: Clock, stats: Any) -> torch.Tensor:
        """c_j (calibrate=False: s_j(q)) of the head set, summed from the prompt's table."""
        return self.table(lm, enc, na, heads, clock, stats).scores(heads, lm.kept_layers, calibrate)


def choose(lm: Any, one_pass: bool, cache: ReadoutCache | None) -> PassForward | TableForward:
    """The strategy of a re-ranker, once: the read-out table when a cache is given, else the tree pass (one_pass), else
    cut-back cache where every cache layer is full attention, else copied cache."""
    if cache is not None:
        return TableForward(cache)
    if one_pass:
        return TreeForward()
    layers = DynamicCache(config=lm.model.config).layers
    return CutBackCache() if all(type(layer).__name__ == "DynamicLayer" for layer in layers) else CopiedCache()
