"""Attention re-ranker (METHOD.md §1-3): one list-wise prompt, query-span attention of a head set, N/A calibration.

`AttentionReranker.score` returns the calibrated score of every candidate together with what it cost (`Scored`: the
scores and the query's `QueryStats`), so callers never read statistics from a side channel; `rerank` returns the
ranked (doc id, score) list of the public API.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from corexp.data.datasets import Document, Ranking
from corexp.engine.forward import Clock, TableForward, choose, read_table, shares_prefix
from corexp.engine.models import LoadedModel
from corexp.engine.prompt import EncodedPrompt, PromptBuilder, PromptSpec, verify_spans
from corexp.engine.readout_cache import HeadTable, ReadoutCache
from corexp.engine.scoring import document_scores, rank
from corexp.errors import CorexpError

log = logging.getLogger(__name__)

Head = tuple[int, int]


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
    """Re-rank candidates of one query with the attention of `heads` (None: all heads = ICR). The forward strategy
    (engine/forward.py) is chosen once: the read-out table (`readout_cache`), the tree pass (`one_pass`, default), or a
    cut-back / copied cache; `calibrate=False` scores s_j(q) alone (the length-bias ablation, METHOD.md §3)."""

    def __init__(self, lm: LoadedModel, prompt: PromptSpec, heads: list[Head] | None = None, template: str = "auto",
                 instruction: str | None = None, one_pass: bool = True, readout_cache: ReadoutCache | None = None,
                 calibrate: bool = True):
        self.lm, self.heads, self.calibrate = lm, heads, calibrate
        self.prompt = PromptBuilder(lm.tokenizer, prompt, template, lm.max_context, instruction)
        self.forward = choose(lm, one_pass, readout_cache)
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

    def doc_texts(self, docs: list[Document]) -> list[str]:
        return self.prompt.doc_texts(docs)

    def calibrated_scores(self, enc: EncodedPrompt, texts_in_order: list[str], stats: QueryStats) -> torch.Tensor:
        """c_j = s_j(q) - s_j("N/A") for the prefix tokens (where all documents are), by the chosen strategy. Causal
        attention: the query rows never see the tokens after the query, so nothing runs past the query's end."""
        needs_na = self.calibrate or isinstance(self.forward, TableForward)  # the table keeps both rows
        na = self.prompt.encode_plain(texts_in_order, self.spec.calibration_query) if needs_na else None
        with Clock(self.lm.device, stats) as clock:
            return self.forward.token_scores(self.lm, enc, na, self.heads, self.calibrate, clock, stats)

    def score(self, query: str, docs: list[Document], query_id: str = "") -> Scored:
        """Calibrated attention score per document (input order) and the query's statistics; candidates dropped for
        length score below all others."""
        if not query.strip():
            raise CorexpError("empty query text")
        stats = QueryStats()
        if not docs:
            return Scored([], stats)
        texts = self.doc_texts(docs)
        enc, order = self.prompt.encode(query, texts, query_id)
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


def prompt_table(rr: AttentionReranker, query: str, docs: list[Document], query_id: str = ""
                 ) -> tuple[HeadTable, EncodedPrompt, list[int]]:
    """Every head's token scores of this query's re-ranking prompt (the atlas, judged detection), from the read-out
    cache or read out once; with the encoded prompt (spans in prompt order) and the candidates' indices in prompt order."""
    if not isinstance(rr.forward, TableForward):
        raise CorexpError("head tables come from the read-out cache: set readout_cache=true")
    texts = rr.doc_texts(docs)
    enc, order = rr.prompt.encode(query, texts, query_id)
    na = rr.prompt.encode_plain([texts[i] for i in order], rr.spec.calibration_query)
    if not shares_prefix(enc, na):
        raise CorexpError("the N/A prompt does not share the documents' tokens with the query's prompt: no head table")
    stats = QueryStats()
    with Clock(rr.lm.device, stats) as clock:
        return rr.forward.table(rr.lm, enc, na, None, clock, stats), enc, order


def instance_table(rr: AttentionReranker, query: str, docs: list[Document]) -> tuple[HeadTable, EncodedPrompt]:
    """Head detection (METHOD.md §4): every head's real and N/A token scores of one instance's prompt, documents in
    the given order, from one forward (the tree pass); with the encoded prompt (its document spans)."""
    texts = rr.doc_texts(docs)
    enc = rr.prompt.encode_plain(texts, query)
    if enc.length > rr.lm.max_context:
        raise CorexpError(f"detection prompt of {enc.length} tokens exceeds the model context ({rr.lm.max_context})")
    na = rr.prompt.encode_plain(texts, rr.spec.calibration_query)
    stats = QueryStats()
    with Clock(rr.lm.device, stats) as clock:
        return read_table(rr.lm, enc, na, clock), enc
