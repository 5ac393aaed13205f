"""Official prompt presets: each paper's prompt string to the character and its spans to the token.

The expected strings below are written by hand from docs/OFFICIAL_PROMPTS.md (two documents; the first-stage top-1
"d1" has a title, "d2" has none; the query has surrounding spaces so that the strip rule shows).
"""

import pytest

from corexp.data.datasets import Document
from corexp.engine.prompt import SpaceWords, TextField, TitleNewlineTextField, TitleTextField, WhitespaceWords, prepare_text
from corexp.engine.reranker import AttentionReranker
from corexp.errors import CorexpError

from helpers import build_job, prompt_spec

DOCS = [Document("d1", "Title A", "first doc text"), Document("d2", "", "second doc text")]
QUERY = " what is x? "
IE = "Please find information that are relevant to the following query in the paragraphs above."
QA = "Please answer the following question based on the information in the paragraphs above."
LLAMA_U, LLAMA_A = "<|start_header_id|>user<|end_header_id|>", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"

EXPECTED = {
    # ICR: prefix + " Here are some paragraphs:" + (S + "[i] " + doc)*N + S + instr + S + "Query:" + " " + q.strip() + suffix;
    # top-1 last; doc = (title + "\n" + text).strip()
    ("icr_official", "llama3"): LLAMA_U + " Here are some paragraphs: \n\n[1] second doc text \n\n[2] Title A\nfirst doc text"
                                 " \n\n" + IE + " \n\nQuery: what is x?" + LLAMA_A,
    ("icr_official", "mistral"): "[INST] Here are some paragraphs:\n\n[1] second doc text\n\n[2] Title A\nfirst doc text"
                                 "\n\n" + IE + "\n\nQuery: what is x?[/INST]",
    # QRHead: Llama = ICR's Llama string with the query not stripped and doc = title + "\n" + text (empty title too)
    ("qrhead_official", "llama3"): LLAMA_U + " Here are some paragraphs: \n\n[1] \nsecond doc text \n\n[2] Title A\nfirst doc text"
                                   " \n\n" + IE + " \n\nQuery:  what is x? " + LLAMA_A,
    ("qrhead_official", "chatml"): "<|im_start|>user Here are some paragraphs:\n\n[1] \nsecond doc text\n\n[2] Title A\nfirst doc text"
                                   "\n\n" + IE + "\n\nQuery:  what is x? <|im_end|>\n<|im_start|>assistant",
    # CoRe: prefix + " Here are some paragraphs:\n\n" + ("[document i] " + text + "\n\n")*N + instr + "\n\nQuery: " + q.strip() + suffix
    ("core_official", "mistral"): "[INST] Here are some paragraphs:\n\n[document 1] first doc text\n\n[document 2] second doc text"
                                  "\n\n" + IE + "\n\nQuery: what is x?[/INST]",
    ("core_official", "llama3"): LLAMA_U + " Here are some paragraphs:\n\n[document 1] first doc text\n\n[document 2] second doc text"
                                 "\n\n" + IE + "\n\nQuery: what is x?" + LLAMA_A,
    ("core_official", "granite"): "<|start_of_role|>user<|end_of_role|> Here are some paragraphs:\n\n[document 1] first doc text\n\n"
                                  "[document 2] second doc text\n\n" + IE + "\n\nQuery: what is x?"
                                  "<|end_of_text|><|start_of_role|>assistant<|end_of_role|>",
    ("core_official", "phi4"): "<|im_start|>user<|im_sep|> Here are some paragraphs:\n\n[document 1] first doc text\n\n"
                               "[document 2] second doc text\n\n" + IE + "\n\nQuery: what is x?<|im_end|><|im_start|>assistant<|im_sep|>",
}
FAMILIES = {"icr_official": {"llama3", "mistral"}, "qrhead_official": {"llama3", "chatml"},
            "core_official": {"mistral", "llama3", "granite", "phi4"}}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from test_reranker import load
    from tiny_models import save_tiny_checkpoint

    return load(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama"))


def reranker(lm, preset, family, dataset="scifact", question_style=False):
    return AttentionReranker(lm, prompt_spec(preset).for_dataset(dataset, question_style), None, template=family)


@pytest.mark.parametrize("preset,family", sorted(EXPECTED))
def test_official_prompt_string_is_exact(tiny_lm, preset, family):
    rr = reranker(tiny_lm, preset, family)
    enc, order = rr.prompt.encode(QUERY, rr.doc_texts(DOCS), "q1")
    assert enc.text == EXPECTED[(preset, family)]
    assert order == ([1, 0] if preset != "core_official" else [0, 1])  # ICR/QRHead: top-1 last


def test_presets_define_exactly_the_papers_families(tiny_lm):
    for preset, families in FAMILIES.items():
        assert set(prompt_spec(preset).families) == families
        with pytest.raises(CorexpError, match=f"prompt={preset} defines the model families .*not 'plain'"):
            reranker(tiny_lm, preset, "plain")


def test_icr_question_instruction_and_fiqa_text_only(tiny_lm):
    rr = reranker(tiny_lm, "icr_official", "mistral", dataset="fiqa", question_style=True)
    text = rr.prompt.encode(QUERY, rr.doc_texts(DOCS))[0].text
    assert QA in text and IE not in text and "Title A" not in text
    assert IE in reranker(tiny_lm, "core_official", "mistral", "fiqa", True).prompt.encode(QUERY, ["x"])[0].text


def test_word_truncation_splits_on_single_spaces_only():
    space = SpaceWords()
    assert prepare_text("", "a  b\nc d e", TextField(), 3, space) == "a  b\nc"  # "a", "", "b\nc"
    assert prepare_text("", "a  b\nc d e", TextField(), 3, WhitespaceWords()) == "a b c"
    assert prepare_text("T", "a b c", TitleTextField(), 2, space) == "T\na b"
    assert prepare_text("", "a b c", TitleNewlineTextField(), 2, space) == "\na b"
    assert prepare_text(None, "a b c", TitleNewlineTextField(), 2, space) == "a b"  # no title field: QRHead adds none
    assert prepare_text("", " a b c ", TextField(), 2, SpaceWords(strip_before_cut=True)) == "a b"  # QRHead: strip, then cut
    assert prepare_text("", " a b c ", TextField(), 2, space) == " a"
    assert prepare_text("", "a b \n c", TextField(), 3, SpaceWords(strip_after_cut=True)) == "a b"  # CoRe: cut, strip
    presets = {p: prompt_spec(p) for p in FAMILIES}
    assert {p: (c.max_words, c.words, c.span_rule.name) for p, c in presets.items()} == {
        "icr_official": (300, SpaceWords(), "icr_incremental"),
        "qrhead_official": (400, SpaceWords(strip_before_cut=True), "offsets"),
        "core_official": (300, SpaceWords(strip_after_cut=True), "core_incremental")}


def _check_official_spans(tok, preset, family, docs, query):
    """The formula's spans (span_rule=offsets: the token span of the named text); the official codes' own counting
    (span_rule=core_incremental / icr_incremental, the presets' default) is checked against their outputs in
    tests/test_parity.py."""
    from types import SimpleNamespace

    query_end = {"core_official": "suffix_first_token"}.get(preset, "prompt_end")  # the formula's query span per paper
    cfg = prompt_spec(preset, "prompt.span_rule=offsets", f"prompt.span_rule.query_span_end={query_end}")
    lm = SimpleNamespace(tokenizer=tok, kept_layers=1, num_heads=1, max_context=10**6)
    rr = AttentionReranker(lm, cfg.for_dataset("scifact", False), None, template=family)
    texts = rr.doc_texts(docs)
    enc, order = rr.prompt.encode(query, texts)
    ids = enc.input_ids[0].tolist()
    offsets = tok(enc.text, return_offsets_mapping=True)["offset_mapping"]
    dec = lambda a, b: tok.decode(ids[a:b], clean_up_tokenization_spaces=False)  # noqa: E731
    for pos, ((a, b), idx) in enumerate(zip(enc.doc_spans, order), 1):
        if preset == "core_official":  # " " + doc after "[document i]", plus the one token after it
            assert dec(a, b - 1).strip() == texts[idx].strip()
            assert dec(a - 1, a).endswith("]") or dec(a - 1, a + 1).startswith("]")
            assert offsets[b - 1][0] >= enc.text.index(texts[idx], offsets[a][0]) + len(texts[idx]) - 1
        else:  # "[i] " + doc, to its last token inclusive
            assert dec(a, b).strip() == f"[{pos}] {texts[idx]}".strip()
    q = dec(enc.q_start, enc.q_end)
    assert q.lstrip().startswith("Please find")
    if preset == "core_official":  # through the query and the first token of the suffix, nothing after
        suffix = cfg.families[family]["suffix"]
        q_end_char = enc.text.rindex(suffix)
        # the last token of the span is the one holding the suffix's first character (a tokenizer may merge it
        # with the query's last character, e.g. "?<"); nothing after it
        assert offsets[enc.q_end - 1][0] <= q_end_char < offsets[enc.q_end - 1][1]
    else:
        assert enc.q_end == len(ids)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3", "qwen25coder"])
@pytest.mark.parametrize("preset,family", sorted(EXPECTED))
def test_official_spans_on_real_tokenizers(model, preset, family, shared_data):
    from transformers import AutoTokenizer

    from corexp.data.datasets import load_local
    from corexp.engine.models import model_source

    job = build_job([f"model={model}"])
    tok = AutoTokenizer.from_pretrained(model_source(job.model, job.paths.cache)[0])
    _check_official_spans(tok, preset, family, DOCS, QUERY)
    ds = load_local(shared_data / "scifact", "test", "scifact")
    for qid in sorted(ds.queries)[:3]:
        ids = [d for d, _ in ds.run[qid][:8]]
        got = ds.docs.get_many(ids)
        _check_official_spans(tok, preset, family, [got[d] for d in ids], ds.queries[qid])
