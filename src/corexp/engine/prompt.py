"""The list-wise prompt (METHOD.md §1) and its token spans, found on one tokenization with offset mappings."""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from corexp.errors import CorexpError

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


def resolve_template(name: str, tokenizer: Any, cfg: Any = None) -> Template:
    """(prefix, suffix, separator) of the prompt for a model family.

    An official preset (prompt.families non-empty) defines its own strings per family and knows no other family;
    corexp's variants use TEMPLATES, or derive the turn markers from the tokenizer's chat template (`auto`).
    """
    families = dict(cfg.get("families") or {}) if cfg is not None else {}
    if families:
        if name not in families:
            raise CorexpError(f"prompt={cfg.get('name')} defines the model families {', '.join(sorted(families))}, "
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


def prepare_text(title: str | None, text: str, field: str, max_words: int | None, split: str = "whitespace",
                 strip: str = "none") -> str:
    """Document text as inserted: its first `max_words` words, optionally with the title (None: the record has none).

    split=whitespace (corexp): runs of whitespace collapse to one space. split=space (the official codes): words are
    split on " " only, so newlines and double spaces survive; strip=after_cut strips the cut text (CoRe's code),
    strip=before_cut strips the text before cutting it (QRHead's driver). Fields: text; title_text = title + "\n" +
    text (without an empty title; stripped with split=space, as ICR); title_newline_text = title + "\n" + text whenever
    the record has a title, even an empty one (QRHead).
    """
    if split == "space":
        source = text.strip() if strip == "before_cut" else text
        body = " ".join(source.split(" ")[:max_words]) if max_words else source
        if strip == "after_cut":
            body = body.strip()
        if field == "title_text":
            return f"{title or ''}\n{body}".strip()
        return f"{title}\n{body}" if field == "title_newline_text" and title is not None else body
    words = text.split()
    if max_words:
        words = words[:max_words]
    body = " ".join(words)
    title = title or ""
    if field == "title_newline_text":
        return f"{title}\n{body}"
    if field == "title_text" and title.strip():
        return f"{' '.join(title.split())}\n{body}" if body else " ".join(title.split())
    return body


def for_dataset(cfg: Any, name: str, question_style: bool) -> Any:
    """The prompt config as used on one data set: ICR's question instruction and text-only rule where they apply."""
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if cfg.get("instruction_style", "fixed") == "auto" and question_style:
        out.instruction = cfg.question_instruction
    if name in (cfg.get("text_only_on") or []):
        out.doc_field = "text"
    return out


def for_detection(cfg: Any, max_words: int | None) -> Any:
    """The prompt config of head detection: documents cut to `max_words` (null: the prompt's), and the span's trailing
    tokens of detection (CoRe's detector sums [start, end), its re-ranker [start, end])."""
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if max_words is not None:  # shorter detection documents: a cheaper detection pass
        out.max_words = int(max_words)
    if out.get("detection_doc_span_extra_tokens") is not None:
        out.doc_span_extra_tokens = int(out.detection_doc_span_extra_tokens)
    return out


def order_documents(doc_ids: list[str], order: str, seed: int, query_id: str) -> list[int]:
    """Positions in the prompt, as indices into the first-stage list."""
    idx = list(range(len(doc_ids)))
    if order == "retriever":
        return idx
    if order == "reversed":
        return idx[::-1]
    digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()  # shuffled, seeded per query
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(idx)
    return idx


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


def build_text(docs: list[str], query: str, cfg: Any, template: tuple[str, ...], instruction: str):
    """The prompt string, the character span of each document under the span convention, the query span start and
    the query end (where the suffix begins)."""
    prefix, suffix = template[0], template[1]
    sep = template[2] if len(template) > 2 else DEFAULT_SEP
    header, separator = cfg.header.replace("{sep}", sep), cfg.separator.replace("{sep}", sep)
    query_prefix = cfg.query_prefix.replace("{sep}", sep)
    if cfg.get("strip_query", False):
        query = query.strip()
    parts = [prefix, header]
    pos = len(prefix) + len(header)
    spans = []
    convention = cfg.get("doc_span", "text")
    for i, doc in enumerate(docs, 1):
        marker = cfg.marker.format(i=i)
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


def encode(tokenizer: Any, docs: list[str], query: str, cfg: Any, template: tuple[str, ...], instruction: str) -> EncodedPrompt:
    """Tokenize the prompt once and find its spans under `prompt.span_rule` (docs/OFFICIAL_PROMPTS.md, "Span rules"):

    offsets (corexp, and QRHead's code): the tokens whose character offsets overlap the named text;
    core_incremental (CoRe's code): token counts of the prompt's prefixes, each tokenized on its own;
    icr_incremental (ICR's code): token counts of the prompt's segments, each tokenized on its own, added up.
    Both incremental rules reproduce their code's off-by-one cases where a tokenizer merges across a boundary.
    """
    text, char_spans, qc_start, qc_end = build_text(docs, query, cfg, template, instruction)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
    extra = int(cfg.get("doc_span_extra_tokens", 0) or 0)
    rule = cfg.get("span_rule", "offsets")
    if rule == "offsets":
        doc_spans, q_start, q_end = _offset_spans(text, [tuple(o) for o in enc["offset_mapping"]], char_spans, qc_start,
                                                  qc_end, extra, cfg.query_span_end)
    elif rule == "core_incremental":
        doc_spans, q_start, q_end = _core_incremental(tokenizer, text, char_spans, qc_start, qc_end, extra,
                                                      Template(*template).span_offset)
    else:  # icr_incremental
        q_text = query.strip() if cfg.get("strip_query", False) else query
        doc_spans, q_start, q_end = _icr_incremental(tokenizer, text, char_spans, qc_end - len(q_text), Template(*template))
    return EncodedPrompt(ids, doc_spans, q_start, q_end, text, [text[a:b] for a, b in char_spans], extra)


def _offset_spans(text: str, offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]], qc_start: int,
                  qc_end: int, extra: int, end_rule: str) -> tuple[list[tuple[int, int]], int, int]:
    lookup = _Offsets(offsets)
    doc_spans = []
    for a, b in char_spans:
        first, last = lookup.span(a, b) if b > a else (0, 0)
        doc_spans.append((first, min(last + extra, len(offsets))) if last > first else (first, last))
    q_start = lookup.span(qc_start, qc_start + 1)[0]
    if end_rule == "prompt_end":
        q_end = len(offsets)
    elif end_rule == "query":
        q_end = lookup.span(qc_end - 1, qc_end)[1]
    else:  # suffix_first_token (CoRe): through the first token of the assistant-turn suffix
        q_end = lookup.span(qc_end, qc_end + 1)[1] if qc_end < len(text) else lookup.span(qc_end - 1, qc_end)[1]
    return doc_spans, q_start, q_end


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

    def __init__(self, tokenizer: Any, cfg: Any, template: str = "auto", max_context: int | None = None,
                 instruction: str | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.template = resolve_template(template, tokenizer, cfg)
        self.instruction = instruction or cfg.instruction
        self.max_context = max_context

    def doc_texts(self, docs: list[Any]) -> list[str]:
        return [prepare_text(d.title, d.text, self.cfg.doc_field, self.cfg.max_words, self.cfg.get("word_split", "whitespace"),
                             self.cfg.get("strip_text", "none")) for d in docs]

    def text(self, texts: list[str], query: str) -> str:
        """The prompt string with the texts in the given order."""
        return build_text(texts, query, self.cfg, self.template, self.instruction)[0]

    def encode_plain(self, texts: list[str], query: str) -> EncodedPrompt:
        """The texts in the given order (detection), no context check."""
        return encode(self.tokenizer, texts, query, self.cfg, self.template, self.instruction)

    def encode(self, query: str, texts: list[str], query_id: str = "") -> tuple[EncodedPrompt, list[int]]:
        """Encode with the configured order; if the prompt overflows the context, drop the lowest-ranked candidates
        (prompt.overflow=reduce) until it fits. Returns the prompt and the candidates' indices in prompt order."""
        n = len(texts)
        while True:
            order = order_documents(list(range(n)), self.cfg.doc_order, self.cfg.seed, query_id)
            enc = encode(self.tokenizer, [texts[i] for i in order], query, self.cfg, self.template, self.instruction)
            if self.max_context is None or enc.length <= self.max_context:
                return enc, order
            if self.cfg.overflow != "reduce" or n == 1:
                fix = "lower prompt.max_words" if n == 1 else "lower first_stage.depth or prompt.max_words, or set prompt.overflow=reduce"
                raise CorexpError(f"prompt of {enc.length} tokens exceeds the model context ({self.max_context}); {fix}")
            n -= 1
