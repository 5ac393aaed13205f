"""The list-wise prompt (METHOD.md §1) and its token spans, found on one tokenization with offset mappings."""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from corexp.errors import CorexpError

log = logging.getLogger(__name__)

# (before user content, after user content); the tokenizer adds BOS itself where the model has one.
TEMPLATES: dict[str, tuple[str, str]] = {
    "mistral": ("[INST] ", " [/INST]"),
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "granite": ("<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"),
    "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "plain": ("", ""),
}

_SENTINEL = "\u2063COREXP\u2063"


def resolve_template(name: str, tokenizer: Any) -> tuple[str, str]:
    """Turn markers for a family, or derived from the tokenizer's chat template (no system prompt)."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name != "auto":
        raise CorexpError(f"unknown prompt template '{name}'; use one of {sorted(TEMPLATES) + ['auto']}")
    if not getattr(tokenizer, "chat_template", None):
        return TEMPLATES["plain"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(_SENTINEL)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and before.startswith(bos):
        before = before[len(bos):]
    return before, after


def prepare_text(title: str, text: str, field: str, max_words: int | None) -> str:
    """Document text as inserted: whitespace collapsed, first `max_words` words, optionally `title\\ntext`."""
    words = text.split()
    if max_words:
        words = words[:max_words]
    body = " ".join(words)
    if field == "title_text" and title.strip():
        return f"{' '.join(title.split())}\n{body}" if body else " ".join(title.split())
    if field not in {"text", "title_text"}:
        raise CorexpError(f"prompt.doc_field must be text or title_text, got '{field}'")
    return body


def order_documents(doc_ids: list[str], order: str, seed: int, query_id: str) -> list[int]:
    """Positions in the prompt, as indices into the first-stage list."""
    idx = list(range(len(doc_ids)))
    if order == "retriever":
        return idx
    if order == "reversed":
        return idx[::-1]
    if order == "shuffled":
        digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "little")).shuffle(idx)
        return idx
    raise CorexpError(f"prompt.doc_order must be retriever, reversed or shuffled, got '{order}'")


@dataclass
class EncodedPrompt:
    """One tokenized prompt: ids, document token spans (prompt order) and the query span [q_start, q_end)."""

    input_ids: torch.Tensor  # (1, n)
    doc_spans: list[tuple[int, int]]
    q_start: int
    q_end: int
    text: str
    span_texts: list[str]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def build_text(docs: list[str], query: str, cfg: Any, template: tuple[str, str], instruction: str):
    """The prompt string with the character spans of each document, the query span start and the query end."""
    parts = [template[0], cfg.header]
    pos = len(template[0]) + len(cfg.header)
    spans = []
    for i, doc in enumerate(docs, 1):
        marker = cfg.marker.format(i=i)
        start = pos if cfg.marker_in_span else pos + len(marker)
        parts += [marker, doc]
        pos += len(marker) + len(doc)
        spans.append((start, pos) if doc else (pos, pos))
        parts.append(cfg.separator)
        pos += len(cfg.separator)
    q_char_start = pos
    parts += [instruction, cfg.query_prefix, query]
    pos += len(instruction) + len(cfg.query_prefix) + len(query)
    q_char_end = pos
    parts.append(template[1])
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


def encode(tokenizer: Any, docs: list[str], query: str, cfg: Any, template: tuple[str, str], instruction: str) -> EncodedPrompt:
    text, char_spans, qc_start, qc_end = build_text(docs, query, cfg, template, instruction)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    lookup = _Offsets(offsets)
    doc_spans = [lookup.span(a, b) if b > a else (0, 0) for a, b in char_spans]
    q_start = lookup.span(qc_start, qc_start + 1)[0]
    if cfg.query_span_end == "prompt_end":
        q_end = len(offsets)
    elif cfg.query_span_end == "query":
        q_end = lookup.span(qc_end - 1, qc_end)[1]
    else:
        raise CorexpError(f"prompt.query_span_end must be query or prompt_end, got '{cfg.query_span_end}'")
    ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
    return EncodedPrompt(ids, doc_spans, q_start, q_end, text, [text[a:b] for a, b in char_spans])


def verify_spans(tokenizer: Any, enc: EncodedPrompt) -> list[int]:
    """Indices of documents whose decoded span differs from the inserted text (whitespace at the edges aside)."""
    bad = []
    ids = enc.input_ids[0].tolist()
    for i, ((a, b), doc) in enumerate(zip(enc.doc_spans, enc.span_texts)):
        decoded = tokenizer.decode(ids[a:b], clean_up_tokenization_spaces=False) if b > a else ""
        if decoded.strip() != doc.strip():
            bad.append(i)
    return bad
