"""A job as typed objects: the validated config, its components, and what follows from them without loading anything —
labels, run name, logged params, identity and the dry-run plan.

`Job.from_config` is the one entry for the CLI, the Python API (`build_reranker`) and PyTerrier: it validates every
setting once, instantiates the four component groups (heads, first_stage, truncation, fusion) from their `_target_`,
and parses the measures once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from corexp.components.base import build
from corexp.components.first_stage import FirstStage
from corexp.components.fusion import Fusion
from corexp.components.heads import HeadSelector
from corexp.components.truncation import Truncation
from corexp.data.evaluation import parse_measures
from corexp.engine.prompt import for_dataset

log = logging.getLogger(__name__)

# Top-level keys that say where or how a job runs, not what it computes.
NOT_IDENTITY = ("paths", "tracking", "hydra", "progress", "debug", "force", "dry_run", "readout_cache")
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Labels:
    """How a job is named: model, method (head selector), first stage, and the extras that change the computation,
    each extra with its group and its text without any one of its settings (for sweep figures)."""

    model: str
    method: str
    first_stage: str
    dataset: str
    extras: list[dict[str, Any]] = field(default_factory=list)  # {"group", "text", "without": {setting: text}}
    method_without: dict[str, str] = field(default_factory=dict)

    def method_label(self, hide_group: str | None = None, hide_setting: str | None = None) -> str:
        """`CoRe-k8 τ=0.1 [trunc=auto, fusion=rrf]`: a report row. hide_*: the swept setting of a sweep figure."""
        method = self.method_without.get(hide_setting, self.method) if hide_group == "heads" else self.method
        extras = [(e["without"].get(hide_setting, e["text"]) if e["group"] == hide_group else e["text"]) for e in self.extras
                  if e["group"] != "first_stage"]
        extras = [e for e in extras if e]
        return method + (f" [{', '.join(extras)}]" if extras else "")

    def run_name(self, varying: dict[str, str] | None = None) -> str:
        """`smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample`, plus any swept setting it does not already show."""
        parts = [self.model, self.method, *[e["text"] for e in self.extras], self.dataset]
        shown = {"model", "model.name", "data", "data.name", "heads", "truncation", "fusion", "first_stage", "prompt",
                 "prompt.name", "prompt.doc_order", "model.dtype"}
        shown |= {f"heads.{s}" for s, text in self.method_without.items() if text != self.method}
        shown |= {f"{e['group']}.{s}" for e in self.extras for s, text in e["without"].items() if text != e["text"]}
        for key, value in sorted((varying or {}).items()):
            bare = key.lstrip("+~")
            if bare not in shown:
                parts.append(f"{bare}={value}")
        return " · ".join(parts)

    def as_tags(self) -> dict[str, str]:
        import json

        return {"model": self.model, "method": self.method, "first_stage_label": self.first_stage, "dataset": self.dataset,
                "method_label": self.method_label(),
                "corexp.labels": json.dumps({"method": self.method, "method_without": self.method_without,
                                             "first_stage": self.first_stage, "extras": self.extras}, ensure_ascii=False)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Labels:
        import json

        parts = json.loads(tags["corexp.labels"])
        return cls(tags.get("model", "?"), parts["method"], parts["first_stage"], tags.get("dataset", "?"), parts["extras"],
                   parts["method_without"])


@dataclass(frozen=True)
class Job:
    cfg: DictConfig
    heads: HeadSelector
    first_stage: FirstStage
    truncation: Truncation  # effective: auto with every head is none
    fusion: Fusion
    measures: list[Any]
    ignored: list[str]  # warnings: settings given for a group whose option does not take them

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Job:
        from corexp.validation import validate

        built = {group: build(cfg[group], group) for group in ("heads", "first_stage", "truncation", "fusion")}
        components = {group: b.component for group, b in built.items()}
        validate(cfg, components)  # once: every setting, the components' own included (e.g. from experiment files)
        ignored = []
        for group, b in built.items():
            hint = getattr(b.component, "ignored_hint", "")
            ignored += [f"{group}.{k}={v} is ignored by {group}={b.component.name}{hint}" for k, v in b.ignored.items()]
        heads = components["heads"]
        return cls(cfg, heads, components["first_stage"], components["truncation"].effective(heads), components["fusion"],
                   parse_measures(list(cfg.data.measures)), ignored)

    # -- what it computes ---------------------------------------------------------------------------
    @property
    def prompt_cfg(self) -> Any:
        """The prompt config as used on this job's data set (ICR's question instruction / text-only rule)."""
        return for_dataset(self.cfg.prompt, self.cfg.data.name, bool(self.cfg.data.get("question_style")))

    @property
    def model_tau(self) -> float:
        return float(self.cfg.model.tau)

    def component_settings(self) -> dict[str, dict[str, Any]]:
        """Each component group as its option name and its own settings (exactly what it computes with)."""
        return {group: {"name": c.name, **c.settings()} for group, c in
                (("heads", self.heads), ("first_stage", self.first_stage), ("truncation", self.truncation),
                 ("fusion", self.fusion))}

    def params(self) -> dict[str, Any]:
        """The resolved config as MLflow logs it: component groups as their own settings, no paths."""
        container = OmegaConf.to_container(self.cfg, resolve=True)
        container.pop("paths", None)
        container.pop("hydra", None)
        container.update(self.component_settings())
        return container

    def identity(self) -> dict[str, Any]:
        """What the job computes: the resolved config minus where and how it runs, the components as their own
        settings, detection only for selectors that detect, the model's precision resolved (auto -> fp32 on a CPU)."""
        from corexp.engine.models import resolved_dtype

        container = OmegaConf.to_container(self.cfg, resolve=True)
        for key in NOT_IDENTITY:
            container.pop(key, None)
        container.update(self.component_settings())
        if not self.heads.needs_detection:
            container.pop("detection", None)
        container["model"]["dtype"] = str(resolved_dtype(self.cfg.model)).replace("torch.", "")
        return container

    # -- how it is named ----------------------------------------------------------------------------
    def labels(self) -> Labels:
        from corexp.engine.models import resolved_dtype

        extras = []
        fs = self.first_stage
        if fs.label() != "BM25":
            extras.append({"group": "first_stage", "text": fs.label(), "without": {}})
        p = self.cfg.prompt
        if p.name not in ("core", "shuffled"):
            text = f"prompt={p.name}" + (f"/{self.cfg.model.template}" if p.get("families") else "")
            extras.append({"group": "prompt", "text": text, "without": {}})
        for group, comp in (("truncation", self.truncation), ("fusion", self.fusion)):
            text = comp.label()
            if text:
                extras.append({"group": group, "text": text,
                               "without": {s: comp.label(frozenset({s})) for s in comp.settings()}})
        if p.doc_order != "retriever":
            extras.append({"group": "prompt", "text": str(p.doc_order), "without": {}})
        dtype = str(resolved_dtype(self.cfg.model)).replace("torch.", "")
        if dtype != "float32":  # the reference precision; bf16/fp16 runs are named so
            extras.append({"group": "model", "text": DTYPE_LABELS.get(dtype, dtype), "without": {}})
        heads = self.heads
        return Labels(str(self.cfg.model.name), heads.label(model_tau=self.model_tau), fs.label(), str(self.cfg.data.name),
                      extras, {s: heads.label(frozenset({s}), model_tau=self.model_tau) for s in heads.settings()})

    # -- what it will do ----------------------------------------------------------------------------
    def plan(self) -> dict[str, Any]:
        """Data set, queries, candidates, method, head count, truncation and detection: `dry_run=true` prints it."""
        from corexp.data.datasets import load_dataset, select_queries

        cfg = self.cfg
        ds = load_dataset(cfg.data)
        qids = select_queries(ds, cfg.data.max_queries, cfg.data.get("query_ids"))
        detection = None
        if self.heads.needs_detection:
            det = cfg.detection
            detection = {"data": det.name, "queries": det.num_queries, "negatives": det.num_negatives,
                         "positions": det.positions, "instances": det.num_queries * det.positions, "fold": det.get("fold"),
                         "max_words": det.max_words if det.get("max_words") is not None else cfg.prompt.max_words}
        labels = self.labels()
        return {
            "run_name": labels.run_name(),
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "queries": len(qids),
            "first_stage": self.first_stage.name,
            "depth": int(self.first_stage.depth),
            "method": labels.method_label(),
            "heads": self.component_settings()["heads"],
            "tau": self.heads.temperature(self.model_tau),
            "truncation": self.component_settings()["truncation"],
            "fusion": self.component_settings()["fusion"],
            "prompt": cfg.prompt.name,
            "max_words": cfg.prompt.max_words,
            "doc_order": cfg.prompt.doc_order,
            "detection": detection,
            "dtype": cfg.model.dtype,
            "device": cfg.model.device,
            "ignored": self.ignored,
        }
