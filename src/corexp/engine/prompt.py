"""The list-wise prompt (METHOD.md §1) and its token spans (docs/OFFICIAL_PROMPTS.md, "Span rules in corexp").

`PromptSpec` is the `prompt` group's component: its strings, and four nested strategies that Hydra instantiates from
their own `_target_` (conf/prompt/<strategy>/*.yaml): the span rule (`OffsetSpans`, `CoreIncrementalSpans`,
`IcrIncrementalSpans`), the document order (`RetrieverOrder`, `ReversedOrder`, `ShuffledOrder`), the document field
(`TextField`, `TitleTextField`, `TitleNewlineTextField`) and the word rule (`WhitespaceWords`, `SpaceWords`).
`PromptBuilder` turns a spec, a tokenizer and a model family's template into encoded prompts.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import torch

from corexp.errors import CorexpError
from corexp.settings import Component, setting

log = logging.getLogger(__name__)

# (before user content, after user content); the tokenizer adds BOS itself where the model has one.
TEMPLATES: dict[str, tuple[str, str]] = {
    "mistral": ("[INST] ", " [/INST]"),
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "granite": ("<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"),
    "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "phi4": ("<|im_start|>user<|im_sep|>", "<|im_end|><|im_start|>assistant<|im_sep|>"),
    "plain": ("", ""),
}
DEFAULT_SEP = "\n\n"


class Template(NamedTuple):
    """A model family's turn markers and separator; span_offset: tokens the official codes subtract from each counted
    segment (their Mistral setting: sentencepiece adds a word-start token before a leading newline)."""

    prefix: str
    suffix: str
    sep: str = DEFAULT_SEP
    span_offset: int = 0

_SENTINEL = "\u2063COREXP\u2063"


def resolve_template(name: str, tokenizer: Any, spec: PromptSpec | None = None) -> Template:
    """(prefix, suffix, separator) of the prompt for a model family.

    An official preset (prompt.families non-empty) defines its own strings per family and knows no other family;
    corexp's variants use TEMPLATES, or derive the turn markers from the tokenizer's chat template (`auto`).
    """
    families = spec.families if spec is not None else {}
    if families:
        if name not in families:
            raise CorexpError(f"prompt={spec.name} defines the model families {', '.join(sorted(families))}, "
                              f"not '{name}'; set model.template to one of them")
        fam = families[name]
        return Template(fam["prefix"], fam["suffix"], fam.get("sep", DEFAULT_SEP), int(fam.get("span_offset", 0)))
    if name in TEMPLATES:
        return Template(*TEMPLATES[name])
    if not getattr(tokenizer, "chat_template", None):
        return Template(*TEMPLATES["plain"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(_SENTINEL)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and before.startswith(bos):
        before = before[len(bos):]
    return Template(before, after)


# -- document order -----------------------------------------------------------------------------------------------
class DocOrder(Component):
    """Where each first-stage candidate goes in the prompt."""

    def order(self, n: int, query_id: str) -> list[int]:
        """Positions in the prompt, as indices into the first-stage list."""
        raise NotImplementedError

    def label(self, hide: frozenset[str] = frozenset()) -> str | None:
        return self.name


@dataclass(frozen=True)
class RetrieverOrder(DocOrder):
    """The first stage's order: its top-1 first (the CoRe protocol)."""

    name: ClassVar[str] = "retriever"

    def order(self, n: int, query_id: str) -> list[int]:
        return list(range(n))

    def label(self, hide: frozenset[str] = frozenset()) -> str | None:
        return None


@dataclass(frozen=True)
class ReversedOrder(DocOrder):
    """The first stage's top-1 last, next to the query (ICR's and QRHead's order)."""

    name: ClassVar[str] = "reversed"

    def order(self, n: int, query_id: str) -> list[int]:
        return list(range(n))[::-1]


@dataclass(frozen=True)
class ShuffledOrder(DocOrder):
    """One seeded permutation per query (the position-bias control): the same for every method."""

    name: ClassVar[str] = "shuffled"
    seed: int = setting(0, ge=0, doc="seed of the permutation (with the query id)")

    def order(self, n: int, query_id: str) -> list[int]:
        idx = list(range(n))
        digest = hashlib.sha256(f"{self.seed}:{query_id}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "little")).shuffle(idx)
        return idx


# -- document text ------------------------------------------------------------------------------------------------
class DocField(Component):
    """Which record fields a document shows: the body alone, or the title too (a convention per word rule)."""

    def whitespace_join(self, title: str | None, body: str) -> str:
        """corexp's convention (WhitespaceWords)."""
        raise NotImplementedError

    def space_join(self, title: str | None, body: str) -> str:
        """The official codes' convention (SpaceWords)."""
        raise NotImplementedError


@dataclass(frozen=True)
class TextField(DocField):
    """The text only."""

    name: ClassVar[str] = "text"

    def whitespace_join(self, title: str | None, body: str) -> str:
        return body

    def space_join(self, title: str | None, body: str) -> str:
        return body


@dataclass(frozen=True)
class TitleTextField(DocField):
    """title + newline + text, without an empty title (stripped with SpaceWords, as ICR's code)."""

    name: ClassVar[str] = "title_text"

    def whitespace_join(self, title: str | None, body: str) -> str:
        title = " ".join((title or "").split())
        if not title:
            return body
        return f"{title}\n{body}" if body else title

    def space_join(self, title: str | None, body: str) -> str:
        return f"{title or ''}\n{body}".strip()


@dataclass(frozen=True)
class TitleNewlineTextField(DocField):
    """title + newline + text whenever the record has a title, even an empty one (QRHead's code)."""

    name: ClassVar[str] = "title_newline_text"

    def whitespace_join(self, title: str | None, body: str) -> str:
        return f"{title or ''}\n{body}"

    def space_join(self, title: str | None, body: str) -> str:
        return body if title is None else f"{title}\n{body}"


class WordRule(Component):
    """How a document is cut to its first `max_words` words, and which field convention applies."""

    def cut(self, text: str, max_words: int | None) -> str:
        raise NotImplementedError

    def join(self, fields: DocField, title: str | None, body: str) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class WhitespaceWords(WordRule):
    """corexp's rule: runs of whitespace collapse to one space."""

    name: ClassVar[str] = "whitespace"

    def cut(self, text: str, max_words: int | None) -> str:
        words = text.split()
        return " ".join(words[:max_words] if max_words else words)

    def join(self, fields: DocField, title: str | None, body: str) -> str:
        return fields.whitespace_join(title, body)


@dataclass(frozen=True)
class SpaceWords(WordRule):
    """The official codes' rule: words split on " " only (newlines and double spaces survive), the text optionally
    stripped before the cut (QRHead's driver) or after it (CoRe's code)."""

    name: ClassVar[str] = "space"
    strip_before_cut: bool = setting(False, doc="strip the text, then cut it (QRHead's driver)")
    strip_after_cut: bool = setting(False, doc="cut the text, then strip it (CoRe's code)")

    def cut(self, text: str, max_words: int | None) -> str:
        source = text.strip() if self.strip_before_cut else text
        body = " ".join(source.split(" ")[:max_words]) if max_words else source
        return body.strip() if self.strip_after_cut else body

    def join(self, fields: DocField, title: str | None, body: str) -> str:
        return fields.space_join(title, body)


def prepare_text(title: str | None, text: str, fields: DocField, max_words: int | None, words: WordRule) -> str:
    """Document text as inserted: its first `max_words` words under the word rule, with the title where the field
    asks for it (title None: the record has no title field)."""
    return words.join(fields, title, words.cut(text, max_words))


# -- span rules ---------------------------------------------------------------------------------------------------
class SpanRule(Component):
    """How the token spans of the documents and of the query are found on the tokenized prompt."""

    def spans(self, tokenizer: Any, text: str, offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]],
              qc_start: int, qc_end: int, extra: int, template: Template, query: str) -> tuple[list[tuple[int, int]], int, int]:
        """(document token spans, query start, query end)."""
        raise NotImplementedError

    def detection_key(self) -> dict[str, Any]:
        """What of the rule enters the detection cache key."""
        return {"span_rule": self.name}


@dataclass(frozen=True)
class OffsetSpans(SpanRule):
    """corexp's rule (and QRHead's code): the tokens whose character offsets overlap the named text."""

    name: ClassVar[str] = "offsets"
    query_span_end: str = setting("query", choices=("query", "prompt_end", "suffix_first_token"),
                                  doc="last token of the query span: the query's, the prompt's, or the suffix's first")

    def spans(self, tokenizer: Any, text: str, offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]],
              qc_start: int, qc_end: int, extra: int, template: Template, query: str) -> tuple[list[tuple[int, int]], int, int]:
        lookup = _Offsets(offsets)
        doc_spans = []
        for a, b in char_spans:
            first, last = lookup.span(a, b) if b > a else (0, 0)
            doc_spans.append((first, min(last + extra, len(offsets))) if last > first else (first, last))
        q_start = lookup.span(qc_start, qc_start + 1)[0]
        return doc_spans, q_start, _QUERY_END[self.query_span_end](lookup, text, qc_end, len(offsets))

    def detection_key(self) -> dict[str, Any]:
        return {"query_span_end": self.query_span_end}  # without the rule's name: the default rule's keys stay as they were


def _suffix_first_token(lookup: _Offsets, text: str, qc_end: int, n: int) -> int:
    """CoRe: through the first token of the assistant-turn suffix."""
    return lookup.span(qc_end, qc_end + 1)[1] if qc_end < len(text) else lookup.span(qc_end - 1, qc_end)[1]


_QUERY_END = {"query": lambda lookup, text, qc_end, n: lookup.span(qc_end - 1, qc_end)[1],
              "prompt_end": lambda lookup, text, qc_end, n: n,
              "suffix_first_token": _suffix_first_token}


@dataclass(frozen=True)
class CoreIncrementalSpans(SpanRule):
    """CoRe's code: token counts of the prompt's prefixes, each tokenized on its own (doc_span=space_text)."""

    name: ClassVar[str] = "core_incremental"

    def spans(self, tokenizer: Any, text: str, offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]],
              qc_start: int, qc_end: int, extra: int, template: Template, query: str) -> tuple[list[tuple[int, int]], int, int]:
        return _core_incremental(tokenizer, text, char_spans, qc_start, qc_end, extra, template.span_offset)


@dataclass(frozen=True)
class IcrIncrementalSpans(SpanRule):
    """ICR's code: token counts of the prompt's segments, each tokenized on its own (doc_span=marker_text)."""

    name: ClassVar[str] = "icr_incremental"

    def spans(self, tokenizer: Any, text: str, offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]],
              qc_start: int, qc_end: int, extra: int, template: Template, query: str) -> tuple[list[tuple[int, int]], int, int]:
        return _icr_incremental(tokenizer, text, char_spans, qc_end - len(query), template)


# -- the prompt ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec(Component):
    """The `prompt` group: the prompt's strings, its span convention and its four strategies (METHOD.md §1)."""

    key_name: ClassVar[str] = "Prompt"

    name: str = setting("core", doc="preset name")
    span_rule: SpanRule = setting(factory=OffsetSpans, doc="how spans are found (prompt/span_rule=offsets, core_incremental, "
                                                           "icr_incremental)")
    doc_order: DocOrder = setting(factory=RetrieverOrder, doc="document order (prompt/doc_order=retriever, reversed, shuffled)")
    doc_field: DocField = setting(factory=TextField, doc="document fields (prompt/doc_field=text, title_text, title_newline_text)")
    words: WordRule = setting(factory=WhitespaceWords, doc="word cut (prompt/words=whitespace: corexp; space: the official codes)")
    header: str = setting("Here are some paragraphs:\n\n", doc="text before the documents ({sep}: the family's separator)")
    marker: str = setting("[document {i}] ", doc="before each document ({i}: its 1-based position)")
    separator: str = setting("\n\n", doc="after each document")
    instruction: str = setting("Please find information that are relevant to the following query in the paragraphs above.",
                               doc="instruction before the query")
    query_prefix: str = setting("\n\nQuery: ", doc="between the instruction and the query")
    families: dict[str, dict[str, Any]] = setting(factory=dict, doc="official presets: model.template -> {prefix, suffix, "
                                                                    "sep, span_offset}; empty: corexp's chat-template variants")
    doc_span: str = setting("text", choices=("text", "marker_text", "space_text"),
                            doc="document span: the text, '[i] ' + text, or ' ' + text after the marker")
    doc_span_extra_tokens: int = setting(0, ge=0, doc="tokens after the document added to its span (CoRe's re-ranker: 1)")
    detection_doc_span_extra_tokens: int | None = setting(None, ge=0, null="prompt.doc_span_extra_tokens",
                                                          doc="the same in head detection (CoRe's detector: 0)")
    text_only_on: list[str] = setting(factory=list, doc="data sets whose documents use the text only (ICR: fiqa)")
    max_words: int | None = setting(100, ge=1, null="whole documents",
                                    doc="words kept per document (the papers: 300; 100 keeps 20 candidates at ~3k tokens on CPU)")
    strip_query: bool = setting(False, doc="strip the query text")
    calibration_query: str = setting("N/A", doc="the content-free query of the calibration")
    instruction_style: str = setting("fixed", choices=("fixed", "auto"),
                                     doc="auto: ICR's question instruction on data sets with data.question_style")
    question_instruction: str = setting("Please answer the following question based on the information in the paragraphs above.",
                                        doc="the question instruction (instruction_style=auto)")
    overflow: str = setting("reduce", choices=("reduce", "error"),
                            doc="a prompt longer than the context: drop the lowest-ranked candidates, or stop")

    def for_dataset(self, dataset: str, question_style: bool) -> PromptSpec:
        """The prompt as used on one data set: ICR's question instruction and text-only rule where they apply."""
        spec = self
        if self.instruction_style == "auto" and question_style:
            spec = replace(spec, instruction=self.question_instruction)
        if dataset in self.text_only_on:
            spec = replace(spec, doc_field=TextField())
        return spec

    def for_detection(self, max_words: int | None) -> PromptSpec:
        """The prompt of head detection: documents cut to `max_words` (None: the prompt's), and the span's trailing
        tokens of detection (CoRe's detector sums [start, end), its re-ranker [start, end])."""
        spec = self if max_words is None else replace(self, max_words=int(max_words))
        if self.detection_doc_span_extra_tokens is not None:
            spec = replace(spec, doc_span_extra_tokens=int(self.detection_doc_span_extra_tokens))
        return spec

    def detection_key(self) -> dict[str, Any]:
        """The span convention's part of the detection cache key (the prompt text enters it on its own)."""
        return {"doc_span": self.doc_span, "doc_span_extra_tokens": self.doc_span_extra_tokens, **self.span_rule.detection_key()}


@dataclass
class EncodedPrompt:
    """One tokenized prompt: ids, document token spans (prompt order) and the query span [q_start, q_end)."""

    input_ids: torch.Tensor  # (1, n)
    doc_spans: list[tuple[int, int]]
    q_start: int
    q_end: int
    text: str
    span_texts: list[str]
    extra_tokens: int = 0  # tokens after each document that its span includes (CoRe's convention: 1)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def build_text(docs: list[str], query: str, spec: PromptSpec, template: tuple[str, ...], instruction: str):
    """The prompt string, the character span of each document under the span convention, the query span start and
    the query end (where the suffix begins)."""
    prefix, suffix = template[0], template[1]
    sep = template[2] if len(template) > 2 else DEFAULT_SEP
    header, separator = spec.header.replace("{sep}", sep), spec.separator.replace("{sep}", sep)
    query_prefix = spec.query_prefix.replace("{sep}", sep)
    if spec.strip_query:
        query = query.strip()
    parts = [prefix, header]
    pos = len(prefix) + len(header)
    spans = []
    convention = spec.doc_span
    for i, doc in enumerate(docs, 1):
        marker = spec.marker.format(i=i)
        text_start = pos + len(marker)
        start = {"text": text_start, "marker_text": pos,
                 "space_text": text_start - (len(marker) - len(marker.rstrip()))}[convention]
        parts += [marker, doc]
        pos += len(marker) + len(doc)
        spans.append((start, pos) if doc else (pos, pos))
        parts.append(separator)
        pos += len(separator)
    q_char_start = pos
    parts += [instruction, query_prefix, query]
    pos += len(instruction) + len(query_prefix) + len(query)
    q_char_end = pos
    parts.append(suffix)
    return "".join(parts), spans, q_char_start, q_char_end


class _Offsets:
    """Token character offsets with binary search: a span lookup costs O(log n), not a scan of the prompt."""

    def __init__(self, offsets: list[tuple[int, int]]):
        self.index = [i for i, (a, b) in enumerate(offsets) if b > a]  # tokens that cover text (no special tokens)
        self.starts = [offsets[i][0] for i in self.index]
        self.ends = [offsets[i][1] for i in self.index]
        self.monotonic = all(x <= y for x, y in zip(self.starts, self.starts[1:])) and \
            all(x <= y for x, y in zip(self.ends, self.ends[1:]))
        self.offsets = offsets

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Tokens overlapping characters [start, end): a contiguous token range."""
        if not self.monotonic:  # unusual tokenizer: scan
            return _token_span(self.offsets, start, end)
        first = bisect.bisect_right(self.ends, start)  # first token ending after `start`
        last = bisect.bisect_left(self.starts, end) - 1  # last token starting before `end`
        if first > last:
            return (0, 0)
        return (self.index[first], self.index[last] + 1)


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Tokens overlapping characters [start, end): a contiguous token range (reference scan)."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        return (0, 0)
    return (hits[0], hits[-1] + 1)


def encode(tokenizer: Any, docs: list[str], query: str, spec: PromptSpec, template: tuple[str, ...], instruction: str) -> EncodedPrompt:
    """Tokenize the prompt once and find its spans with the spec's span rule (docs/OFFICIAL_PROMPTS.md, "Span rules"):
    offsets (corexp, and QRHead's code), core_incremental (CoRe's code), icr_incremental (ICR's code); the incremental
    rules reproduce their code's off-by-one cases where a tokenizer merges across a boundary."""
    text, char_spans, qc_start, qc_end = build_text(docs, query, spec, template, instruction)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
    extra = int(spec.doc_span_extra_tokens)
    q_text = query.strip() if spec.strip_query else query
    doc_spans, q_start, q_end = spec.span_rule.spans(tokenizer, text, [tuple(o) for o in enc["offset_mapping"]], char_spans,
                                                     qc_start, qc_end, extra, Template(*template), q_text)
    return EncodedPrompt(ids, doc_spans, q_start, q_end, text, [text[a:b] for a, b in char_spans], extra)


def _counter(tokenizer: Any):
    """Tokens of a string tokenized on its own, special tokens included (as `len(tokenizer(s).input_ids)`)."""
    return lambda s: len(tokenizer(s, add_special_tokens=True)["input_ids"])


def _core_incremental(tokenizer: Any, text: str, char_spans: list[tuple[int, int]], qc_start: int, qc_end: int,
                      extra: int, offset: int) -> tuple[list[tuple[int, int]], int, int]:
    """CoRe's rule: a document starts at the token count of the prompt through its `[document i]` marker and ends
    at the count through the document (minus the family offset), plus `extra` tokens (its re-ranker: 1; its detector:
    0); the query rows run from the count through the separator before the instruction to the count through the
    query (minus the offset), inclusive. Expects doc_span=space_text (the span starts where the marker ends)."""
    n = _counter(tokenizer)
    spans = [(n(text[:a]), n(text[:b]) - offset + extra) for a, b in char_spans]
    return spans, n(text[:qc_start]), n(text[:qc_end]) - offset + 1


def _icr_incremental(tokenizer: Any, text: str, char_spans: list[tuple[int, int]], query_char: int,
                     template: Template) -> tuple[list[tuple[int, int]], int, int]:
    """ICR's rule: the prompt is counted segment by segment, each tokenized on its own without its special tokens
    (BOS) and the family offset: the header, then `sep + "[i] " + doc` per document (the span: the segment minus the
    separator's own count), then `sep + instruction + sep + "Query:"`, then `" " + query + suffix`; the query rows run
    from the instruction to the last token. Expects doc_span=marker_text and a query prefix ending in a space."""
    n = _counter(tokenizer)
    bos, offset, sep = n(""), template.span_offset, template.sep
    sep_len = n(sep) - bos - offset
    spans = []
    length = n(text[:char_spans[0][0]]) - sep_len if char_spans else 0
    for a, b in char_spans:
        length += sep_len
        doc_len = n(text[a - len(sep):b]) - bos - sep_len - offset
        spans.append((length, length + doc_len))
        length += doc_len
    last = char_spans[-1][1] if char_spans else 0
    q_start = length + sep_len
    query_seg = query_char - 1 if text[query_char - 1:query_char] == " " else query_char
    length += n(text[last:query_seg]) - bos - offset
    length += n(text[query_seg:]) - bos - offset
    if length != n(text):
        log.debug("ICR span rule: segment count %d differs from the prompt's %d tokens", length, n(text))
    return spans, q_start, length


def verify_spans(tokenizer: Any, enc: EncodedPrompt) -> list[int]:
    """Indices of documents whose decoded span (without the convention's trailing tokens) differs from the inserted
    text, whitespace at the edges aside."""
    bad = []
    ids = enc.input_ids[0].tolist()
    for i, ((a, b), doc) in enumerate(zip(enc.doc_spans, enc.span_texts)):
        b = b - enc.extra_tokens if b - a > enc.extra_tokens else b
        decoded = tokenizer.decode(ids[a:b], clean_up_tokenization_spaces=False) if b > a else ""
        if decoded.strip() != doc.strip():
            bad.append(i)
    return bad


class PromptBuilder:
    """The list-wise prompt of one model and prompt config: document texts, the template, encoding with the configured
    order and context limit. Needs the tokenizer only (no weights): detection keys its cache with it."""

    def __init__(self, tokenizer: Any, spec: PromptSpec, template: str = "auto", max_context: int | None = None,
                 instruction: str | None = None):
        self.tokenizer = tokenizer
        self.spec = spec
        self.template = resolve_template(template, tokenizer, spec)
        self.instruction = instruction or spec.instruction
        self.max_context = max_context

    def doc_texts(self, docs: list[Any]) -> list[str]:
        return [prepare_text(d.title, d.text, self.spec.doc_field, self.spec.max_words, self.spec.words) for d in docs]

    def text(self, texts: list[str], query: str) -> str:
        """The prompt string with the texts in the given order."""
        return build_text(texts, query, self.spec, self.template, self.instruction)[0]

    def encode_plain(self, texts: list[str], query: str) -> EncodedPrompt:
        """The texts in the given order (detection), no context check."""
        return encode(self.tokenizer, texts, query, self.spec, self.template, self.instruction)

    def encode(self, query: str, texts: list[str], query_id: str = "") -> tuple[EncodedPrompt, list[int]]:
        """Encode with the configured order; if the prompt overflows the context, drop the lowest-ranked candidates
        (prompt.overflow=reduce) until it fits. Returns the prompt and the candidates' indices in prompt order."""
        n = len(texts)
        while True:
            order = self.spec.doc_order.order(n, query_id)
            enc = encode(self.tokenizer, [texts[i] for i in order], query, self.spec, self.template, self.instruction)
            if self.max_context is None or enc.length <= self.max_context:
                return enc, order
            if self.spec.overflow != "reduce" or n == 1:
                fix = "lower prompt.max_words" if n == 1 else "lower first_stage.depth or prompt.max_words, or set prompt.overflow=reduce"
                raise CorexpError(f"prompt of {enc.length} tokens exceeds the model context ({self.max_context}); {fix}")
            n -= 1
