"""Config plumbing: where conf/ lives, OmegaConf resolvers, and structured schemas that catch typos early."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _register_resolvers() -> None:
    resolvers = {
        "corexp_root": lambda: str(project_root()),
        "corexp_resource": lambda name: str(RESOURCES_DIR / name),
        "corexp_data_folder": data_folder,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


@dataclass
class HeadsConfig:
    metric: str = "all"  # all | core | qrhead | random | published
    k: int = 8
    tau: float | None = None  # None: the model's default (METHOD.md §4)
    seed: int = 0
    layers: Any = None  # optional explicit list of "layer-head" strings (metric=published uses the model's list)


@dataclass
class TruncationConfig:
    mode: str = "none"  # none | fraction | layers | auto
    fraction: float = 0.0
    layers: int | None = None


@dataclass
class FirstStageConfig:
    source: str = "auto"  # auto | run | bm25
    depth: int = 20
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stemmer: str = "english"
    stopwords: str = "en"


@dataclass
class FusionConfig:
    mode: str = "none"  # none | linear | rrf
    alpha: float = 0.5
    rrf_k: int = 60


@dataclass
class PromptConfig:
    header: str = "Here are some paragraphs:\n\n"
    marker: str = "[document {i}] "
    marker_in_span: bool = False
    separator: str = "\n\n"
    instruction: str = "Please find information that are relevant to the following query in the paragraphs above."
    query_prefix: str = "\n\nQuery: "
    query_span_end: str = "query"  # query | prompt_end
    doc_order: str = "retriever"  # retriever | reversed | shuffled
    doc_field: str = "text"  # text | title_text
    max_words: int = 100
    calibration_query: str = "N/A"
    instruction_style: str = "fixed"  # fixed | auto (ICR's question instruction on data.question_style sets)
    question_instruction: str = "Please answer the following question based on the information in the paragraphs above."
    overflow: str = "reduce"  # reduce (drop the lowest-ranked candidates until the prompt fits) | error
    seed: int = 0


def register_configs() -> None:
    """Schemas for the groups whose typos would otherwise pass silently."""
    cs = ConfigStore.instance()
    cs.store(group="heads", name="schema_heads", node=HeadsConfig)
    cs.store(group="truncation", name="schema_truncation", node=TruncationConfig)
    cs.store(group="first_stage", name="schema_first_stage", node=FirstStageConfig)
    cs.store(group="fusion", name="schema_fusion", node=FusionConfig)
    cs.store(group="prompt", name="schema_prompt", node=PromptConfig)


_register_resolvers()
register_configs()

__all__ = ["MISSING", "config_dir", "project_root", "field", "RESOURCES_DIR"]
