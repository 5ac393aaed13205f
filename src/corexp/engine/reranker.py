"""Attention re-ranker (METHOD.md §1-3): one list-wise prompt, query-span attention of a head set, N/A calibration.

`AttentionReranker.score` returns the calibrated score of every candidate together with what it cost (`Scored`: the
scores and the query's `QueryStats`), so callers never read statistics from a side channel; `rerank` returns the
ranked (doc id, score) list of the public API.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from corexp.data.datasets import Document, Ranking
from corexp.engine.attention import Readout, TreePass, recording, tree_pass
from corexp.engine.models import LoadedModel
from corexp.engine.prompt import EncodedPrompt, PromptBuilder, PromptSpec, verify_spans
from corexp.engine.readout_cache import HeadTable, ReadoutCache
from corexp.engine.scoring import document_scores, rank
from corexp.errors import CorexpError

log = logging.getLogger(__name__)

Head = tuple[int, int]


def heads_by_layer(heads: list[Head] | None) -> dict[int, list[int]] | None:
    if heads is None:
        return None
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return {k: sorted(set(v)) for k, v in out.items()}


def shares_prefix(enc: EncodedPrompt, na: EncodedPrompt) -> bool:
    """The N/A prompt has the real prompt's tokens up to the query (the documents): one forward can serve both."""
    return na.q_start == enc.q_start and torch.equal(na.input_ids[0, :enc.q_start], enc.input_ids[0, :enc.q_start])


@dataclass
class QueryStats:
    """What scoring one query cost: prompt tokens, each forward call's tokens and seconds, dropped candidates."""

    prompt_tokens: int = 0
    pass_tokens: list[int] = field(default_factory=list)
    pass_seconds: list[float] = field(default_factory=list)
    dropped_docs: int = 0
    span_mismatches: int = 0
    cached: bool = False  # the scores came from the read-out cache (no forward ran)
    degenerate: str = ""  # why the scores carry no ranking (non-finite attention, every score equal); "" when they do


@dataclass
class Scored:
    """Calibrated score per candidate (input order) and the query's statistics."""

    scores: list[float]
    stats: QueryStats


class AttentionReranker:
    """Re-rank candidates of one query with the attention of `heads` (None: all heads = ICR)."""

    def __init__(self, lm: LoadedModel, prompt: PromptSpec, heads: list[Head] | None = None, template: str = "auto",
                 instruction: str | None = None, one_pass: bool = True, readout_cache: ReadoutCache | None = None,
                 calibrate: bool = True):
        self.lm = lm
        self.calibrate = calibrate  # False: s_j(q) alone, no N/A query (the length-bias ablation, METHOD.md §3)
        self.one_pass = one_pass  # real and N/A query in one forward (tree attention); False: N/A on the cached prefix
        self.readout_cache = readout_cache  # every head's token scores per prompt, reused by other head sets
        self.heads = heads
        self.prompt = PromptBuilder(lm.tokenizer, prompt, template, lm.max_context, instruction)
        self._croppable: bool | None = None
        if heads is not None:
            bad = [h for h in heads if not (0 <= h[0] < lm.kept_layers and 0 <= h[1] < lm.num_heads)]
            if bad:
                raise CorexpError(
                    f"heads {bad[:3]} are outside the model ({lm.kept_layers} layers kept x {lm.num_heads} heads)"
                )
            if not heads:
                raise CorexpError("the head set is empty; choose heads.k >= 1")

    @property
    def spec(self) -> PromptSpec:
        return self.prompt.spec

    @property
    def template(self) -> Any:
        return self.prompt.template

    @property
    def instruction(self) -> str:
        return self.prompt.instruction

    def doc_texts(self, docs: list[Document]) -> list[str]:
        return self.prompt.doc_texts(docs)

    def encode(self, query: str, texts: list[str], query_id: str = "") -> tuple[EncodedPrompt, list[int]]:
        return self.prompt.encode(query, texts, query_id)

    # -- forward passes -------------------------------------------------------------------------
    @property
    def croppable(self) -> bool:
        """Every cache layer is full attention: a cache can be cut back to the prefix instead of being copied."""
        if self._croppable is None:
            layers = DynamicCache(config=self.lm.model.config).layers
            self._croppable = all(type(layer).__name__ == "DynamicLayer" for layer in layers)
        return self._croppable

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, start: int, end: int, cache, rec: Readout | None, clock: _Clock):
        """Run tokens [start, end) of `ids` on top of `cache` (None: from scratch); the read-out records if given."""
        with clock.timed(end - start), recording(rec):
            out = self.lm.model(ids[:, start:end].to(self.lm.device), cache=cache, use_cache=True)
        return out.cache

    @torch.inference_mode()
    def _tree_forward(self, enc: EncodedPrompt, na: EncodedPrompt, tree: TreePass, clock: _Clock) -> None:
        """One forward over [documents | real query | N/A query] with the N/A position ids continuing after the
        documents; the attention function keeps the two queries apart (attention.TreePass)."""
        n_na = na.q_end - na.q_start
        ids = torch.cat([enc.input_ids[:, :enc.q_end], na.input_ids[:, na.q_start:na.q_end]], dim=1).to(self.lm.device)
        pos = torch.cat([torch.arange(enc.q_end), torch.arange(enc.q_start, enc.q_start + n_na)])[None].to(self.lm.device)
        # A placeholder 4-D mask: models return a prepared mask as-is instead of building an n x n one; the attention
        # function applies the tree's own masks.
        placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.lm.device)
        with clock.timed(int(ids.shape[1])), tree_pass(tree):
            self.lm.model(ids, position_ids=pos, attention_mask=placeholder, use_cache=False)

    def _token_scores(self, rec: Readout, length: int) -> torch.Tensor:
        total = None
        for layer in sorted(rec.layers):
            s = rec.layers[layer].sum(dim=0)
            total = s if total is None else total + s
        return total[:length].float().cpu()

    def calibrated_scores(self, enc: EncodedPrompt, texts_in_order: list[str], stats: QueryStats) -> torch.Tensor:
        """c_j = s_j(q) - s_j("N/A") for the prefix tokens (where all documents are).

        Causal attention: the query rows never see the tokens after the query, so nothing runs past the query's end.
        one_pass (default): [documents | query | N/A query] in one forward, the N/A rows kept apart from the real
        query by the attention function (TreePass). Otherwise, full-attention models run documents + query, cut the
        cache back to the documents and run the N/A query on top; sliding-window caches cannot be cut back, so there
        the documents run alone and their cache is copied. All paths give the same scores (tests/test_reranker.py).
        """
        heads = heads_by_layer(self.heads)
        q_start = enc.q_start
        clock = _Clock(self.lm.device, stats)
        if not self.calibrate and self.readout_cache is None:  # s_j(q) alone: documents + query, no N/A query
            real_rec = Readout(heads, rows=(q_start, enc.q_end), past_len=0)
            self._forward(enc.input_ids, 0, enc.q_end, None, real_rec, clock)
            scores = self._token_scores(real_rec, q_start)
            clock.close()
            return scores

        def na_encoding():
            na = self.prompt.encode_plain(texts_in_order, self.spec.calibration_query)
            return na, shares_prefix(enc, na)

        if self.one_pass:
            na, shared = na_encoding()
            if shared and self.readout_cache is not None:
                return self._cached_scores(enc, na, stats, clock)
            if shared:  # real and N/A query rows in one forward (tree attention): no second pass at all
                real_rec = Readout(heads, rows=(q_start, enc.q_end), past_len=0)
                na_rec = Readout(heads, rows=(0, na.q_end - na.q_start), past_len=q_start)
                self._tree_forward(enc, na, TreePass(q_start, enc.q_end, real_rec, na_rec), clock)
                scores = self._token_scores(real_rec, q_start) - self._token_scores(na_rec, q_start)
                clock.close()
                return scores
        if self.croppable:
            real_rec = Readout(heads, rows=(q_start, enc.q_end), past_len=0)
            cache = self._forward(enc.input_ids, 0, enc.q_end, None, real_rec, clock)
            na, shared = na_encoding()  # on a GPU this overlaps the pass just queued
            if shared:
                cache.crop(q_start - enc.q_end)  # negative: drop the query tokens
        else:
            real_rec = Readout(heads, rows=(0, enc.q_end - q_start), past_len=q_start)
            na, shared = na_encoding()
            prefix = self._forward(enc.input_ids, 0, q_start, None, None, clock)
            cache = copy.deepcopy(prefix) if shared else None
            self._forward(enc.input_ids, q_start, enc.q_end, prefix, real_rec, clock)
        if not shared:  # tokenization differs inside the prefix: the N/A prompt needs its own prefix pass
            log.warning("N/A prompt does not share the prefix tokens; running a full calibration pass")
            cache = self._forward(na.input_ids, 0, na.q_start, None, None, clock)
        na_rec = Readout(heads, rows=(0, na.q_end - na.q_start), past_len=na.q_start)
        self._forward(na.input_ids, na.q_start, na.q_end, cache, na_rec, clock)
        scores = self._token_scores(real_rec, q_start) - self._token_scores(na_rec, q_start)  # synchronizes
        clock.close()
        return scores

    def _cached_scores(self, enc: EncodedPrompt, na: EncodedPrompt, stats: QueryStats, clock: _Clock) -> torch.Tensor:
        """c_j of this head set from the prompt's table of every head (readout_cache.py); computed once per prompt."""
        return self._table(enc, na, stats, clock).scores(self.heads, self.lm.kept_layers, self.calibrate)

    def _table(self, enc: EncodedPrompt, na: EncodedPrompt, stats: QueryStats, clock: _Clock) -> HeadTable:
        """The prompt's table of every head, from the read-out cache, or read out once (one forward) and stored."""
        cache = self.readout_cache
        key = cache.key(enc.input_ids[0, :enc.q_end], na.input_ids[0, na.q_start:na.q_end], enc.q_start)
        table = cache.load(key)
        if table is not None and table.covers(self.heads, self.lm.kept_layers):
            cache.hits += 1
            stats.cached = True
            return table
        table = self._read_table(enc, na, clock)
        cache.store(key, table)
        return table

    def _read_table(self, enc: EncodedPrompt, na: EncodedPrompt, clock: _Clock) -> HeadTable:
        """Every head's token scores s_j of the real and the N/A query over the document tokens j < q_start: one tree
        forward when the N/A prompt shares the documents' tokens, else a forward of each prompt."""
        real_rec = Readout(None, rows=(enc.q_start, enc.q_end), past_len=0)
        if shares_prefix(enc, na):
            na_rec = Readout(None, rows=(0, na.q_end - na.q_start), past_len=enc.q_start)
            self._tree_forward(enc, na, TreePass(enc.q_start, enc.q_end, real_rec, na_rec), clock)
        else:
            log.warning("N/A prompt does not share the prefix tokens; running a full calibration pass")
            na_rec = Readout(None, rows=(na.q_start, na.q_end), past_len=0)
            self._forward(enc.input_ids, 0, enc.q_end, None, real_rec, clock)
            self._forward(na.input_ids, 0, na.q_end, None, na_rec, clock)
        labels, real = real_rec.head_matrix()
        _, calib = na_rec.head_matrix()
        n = enc.q_start
        calib = torch.nn.functional.pad(calib[:, :n], (0, max(0, n - calib.shape[1])))
        table = HeadTable(labels, real[:, :n].float().cpu(), calib.float().cpu())
        clock.close()
        return table

    def head_table(self, query: str, docs: list[Document], query_id: str = "") -> tuple[HeadTable, EncodedPrompt, list[int]]:
        """Every head's token scores of this query's prompt (studies: the head atlas), from the read-out cache or read
        out once; with the encoded prompt (spans in prompt order) and the candidates' indices in prompt order."""
        if self.readout_cache is None:
            raise CorexpError("head tables come from the read-out cache: set readout_cache=true")
        texts = self.doc_texts(docs)
        enc, order = self.encode(query, texts, query_id)
        na = self.prompt.encode_plain([texts[i] for i in order], self.spec.calibration_query)
        if not shares_prefix(enc, na):
            raise CorexpError("the N/A prompt does not share the documents' tokens with the query's prompt: no head table")
        stats = QueryStats()
        return self._table(enc, na, stats, _Clock(self.lm.device, stats)), enc, order

    def detection_readout(self, query: str, docs: list[Document]) -> tuple[HeadTable, EncodedPrompt]:
        """Head detection (METHOD.md §4): every head's real and N/A token scores of one instance's prompt, documents in
        the given order, from one forward (the tree pass); with the encoded prompt (its document spans)."""
        texts = self.doc_texts(docs)
        enc = self.prompt.encode_plain(texts, query)
        if enc.length > self.lm.max_context:
            raise CorexpError(f"detection prompt of {enc.length} tokens exceeds the model context ({self.lm.max_context})")
        na = self.prompt.encode_plain(texts, self.spec.calibration_query)
        stats = QueryStats()
        return self._read_table(enc, na, _Clock(self.lm.device, stats)), enc

    # -- public API -----------------------------------------------------------------------------
    def score(self, query: str, docs: list[Document], query_id: str = "") -> Scored:
        """Calibrated attention score per document (input order) and the query's statistics; candidates dropped for
        length score below all others."""
        if not query.strip():
            raise CorexpError("empty query text")
        stats = QueryStats()
        if not docs:
            return Scored([], stats)
        texts = self.doc_texts(docs)
        enc, order = self.encode(query, texts, query_id)
        stats.prompt_tokens, stats.dropped_docs = enc.length, len(docs) - len(order)
        stats.span_mismatches = len(verify_spans(self.lm.tokenizer, enc))
        c = self.calibrated_scores(enc, [texts[i] for i in order], stats)
        in_prompt = document_scores(c, enc.doc_spans)
        if not bool(torch.isfinite(c).all()):
            stats.degenerate = "non-finite attention scores"
        elif len(in_prompt) > 1 and max(in_prompt) == min(in_prompt):
            stats.degenerate = f"all {len(in_prompt)} scores equal ({in_prompt[0]:g})"
        scores = [0.0] * len(docs)
        for pos, idx in enumerate(order):
            scores[idx] = in_prompt[pos]
        if len(order) < len(docs):  # candidates dropped for context length rank after the scored ones
            floor = min(in_prompt) - 1.0
            for k, idx in enumerate(sorted(set(range(len(docs))) - set(order))):
                scores[idx] = floor - k
        return Scored(scores, stats)

    def rerank(self, query: str, docs: list[Document] | list[tuple[str, str]] | list[str], query_id: str = "") -> Ranking:
        """Ranked (doc id, score), best first. Accepts Documents, (id, text) pairs or plain texts (ids "0", "1", ...)."""
        norm = [
            d if isinstance(d, Document) else Document(d[0], None, d[1]) if isinstance(d, tuple) else Document(str(i), None, d)
            for i, d in enumerate(docs)
        ]
        return rank([d.id for d in norm], self.score(query, norm, query_id).scores)


class _Clock:
    """Tokens and time of each forward: CUDA events on a GPU (no synchronize: the CPU runs ahead, e.g. tokenizes the N/A
    prompt, while the GPU works; read out after the scores sync), wall time on a CPU."""

    def __init__(self, device: torch.device, stats: QueryStats):
        self.cuda = device.type == "cuda"
        self.stats = stats
        self.events: list[Any] = []

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

    def close(self) -> None:
        self.stats.pass_seconds += [a.elapsed_time(b) / 1000 for a, b in self.events]
        self.events = []
