"""A job as typed objects, built once at the door: `Job.from_config` instantiates every config group from its
`_target_` (nested strategies included), checks every setting against its declaration, parses the measures and reads
Hydra's runtime context; below it nothing reads the DictConfig.

From the components follow, without loading anything: the run's identity (its settings, the data as its content
fingerprint, the code digest), its name and labels, its logged params and the dry-run plan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from corexp.components.detection import Detection
from corexp.components.first_stage import FirstStage
from corexp.components.fusion import Fusion
from corexp.components.heads import HeadSelector
from corexp.components.truncation import Truncation
from corexp.config import GROUP_CLASSES, GROUPS, Paths, RunOptions, build
from corexp.data.datasets import DataSource
from corexp.data.evaluation import parse_measures
from corexp.engine.models import ModelInfo, ModelSpec
from corexp.engine.prompt import PromptSpec
from corexp.engine.scoring import Scoring
from corexp.errors import CorexpError
from corexp.files import stable_key
from corexp.settings import Component, declarations, plain, problem
from corexp.tracking.identity import Identity, code_digest, provenance_tags
from corexp.tracking.labels import Labels
from corexp.tracking.tracker import RunRequest, TrackingSpec

log = logging.getLogger(__name__)

DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16"}
LOCATION_KEYS = ("local_dir", "run_file", "irds_id")  # where data comes from: replaced by its content in the identity
DEFAULT_DETECTION = "scifact-train-sample"  # detection=default: not named in run names
# Overrides that say where a job reads or writes, not what it computes: left out of run names.
_NAME_NOISE = ("paths.", "tracking.", "hydra.", "progress", "debug", "force", "experiment", "seed", "readout_cache", "dry_run")
_NAME_NOISE_SUFFIX = ("local_dir", ".path", "run_file", "cache_dir")


@dataclass(frozen=True)
class RunContext:
    """Where a job runs inside Hydra: its overrides, the settings its sweep varies, the sweep's parent run, its folder."""

    overrides: tuple[str, ...] = ()
    swept: tuple[str, ...] = ()
    parent_run_id: str | None = None
    output_dir: str | None = None

    @classmethod
    def current(cls) -> RunContext:
        from hydra.core.hydra_config import HydraConfig

        from corexp.callbacks import SWEPT_FILE, sweep_parent

        try:
            hc = HydraConfig.get()
        except ValueError:
            return cls()
        parent, swept = None, ()
        if hc.mode.name == "MULTIRUN":
            folder = Path(hc.sweep.dir)
            parent = sweep_parent(folder)
            swept = tuple(json.loads((folder / SWEPT_FILE).read_text())) if (folder / SWEPT_FILE).is_file() else ()
        return cls(tuple(hc.overrides.task), swept, parent, hc.runtime.output_dir)


@dataclass(frozen=True)
class Job:
    """Every component of one job, built and checked; what it computes follows from them."""

    options: RunOptions
    paths: Paths
    model: ModelSpec
    data: DataSource
    prompt: PromptSpec  # as configured; `prompt_for_data` is what the job's data set reads
    heads: HeadSelector
    first_stage: FirstStage
    truncation: Truncation  # as configured; `cut` is what this job's head selector makes of it
    fusion: Fusion
    scoring: Scoring
    detection: Detection
    tracking: TrackingSpec
    measures: tuple[Any, ...]
    ignored: tuple[str, ...] = ()  # warnings: settings given for a group whose option does not take them
    context: RunContext = field(default_factory=RunContext)
    config_text: str = ""  # the resolved config, as logged (config.yaml)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Job:
        """The door: build every group from its `_target_`, check every setting, read Hydra's runtime context."""
        groups = {group: build(cfg[group], group) for group in (*GROUPS, *[g for g in GROUP_CLASSES if "/" not in g])}
        components = {group: b.component for group, b in groups.items()}
        options = RunOptions(**{f: cfg[f] for f in RunOptions.__dataclass_fields__})
        validate({**components, "": options})
        ignored = tuple(f"{group}.{k}={v} is ignored by {group}={b.component.name}{getattr(b.component, 'ignored_hint', '')}"
                        for group, b in groups.items() for k, v in b.ignored.items())
        data = components["data"]
        heads = components["heads"]
        return cls(options=options, paths=_paths(cfg), model=components["model"], data=data, prompt=components["prompt"],
                   heads=heads, first_stage=components["first_stage"], truncation=components["truncation"],
                   fusion=components["fusion"], scoring=components["scoring"], detection=components["detection"],
                   tracking=components["tracking"], measures=tuple(parse_measures(list(data.measures))), ignored=ignored,
                   context=RunContext.current(), config_text=_config_text(cfg))

    @property
    def cut(self) -> Truncation:
        """The truncation this job really has (auto with every head is none)."""
        return self.truncation.effective(self.heads)

    def components(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "prompt": self.prompt, "heads": self.heads,
                "first_stage": self.first_stage, "truncation": self.cut, "fusion": self.fusion,
                "scoring": self.scoring, "detection": self.detection, "tracking": self.tracking}

    # -- what it computes ---------------------------------------------------------------------------------------
    @property
    def prompt_for_data(self) -> PromptSpec:
        """The prompt as used on this job's data set (ICR's question instruction / text-only rule)."""
        return self.prompt.for_dataset(self.data.name, self.data.question_style)

    @property
    def cache(self) -> Path:
        return self.paths.cache

    def check_dims(self, info: ModelInfo) -> None:
        """Settings bounded by the model's size, from its config alone (before any weight is loaded)."""
        self.heads.check_dims(info.n_layers, info.n_heads)
        self.cut.check_dims(info.n_layers)

    def computed_settings(self) -> dict[str, Any]:
        """What the job computes with: every component's own settings (the prompt as its data set reads it, the model's
        precision resolved, detection only for selectors that detect), where data comes from left out."""
        settings: dict[str, Any] = {"seed": self.options.seed}
        for group, component in self.components().items():
            if group == "tracking" or (group == "detection" and not self.heads.needs_detection):
                continue
            settings[group] = plain(self.prompt_for_data if group == "prompt" else component)  # {"name", settings}
        settings["model"]["dtype"] = str(self.model.torch_dtype).replace("torch.", "")
        for group in ("data", "detection"):
            for key in LOCATION_KEYS:
                settings.get(group, {}).pop(key, None)
        return settings

    def identity(self) -> Identity:
        """The run's identity: its settings with each data set as its content (never a path), and the code digest."""
        setup = self.computed_settings()
        content = {"data": self.data.fingerprint(self.cache)}
        if self.heads.needs_detection:
            content["detection"] = self.detection.fingerprint(self.cache)
        fingerprint = stable_key(content)
        return Identity(stable_key({**setup, "content": content}), code_digest(), stable_key(setup), fingerprint)

    def keys(self) -> dict[str, str]:
        """Each computing component's key (settings.Component.key: `CoRe(tau=0.1)`), the model's τ resolved."""
        heads = self.heads
        if getattr(heads, "tau", 0) is None:
            heads = dataclasses.replace(heads, tau=self.model.tau)
        return {group: (heads if group == "heads" else c).key() for group, c in self.components().items()
                if group != "tracking" and (group != "detection" or self.heads.needs_detection)}

    def params(self) -> dict[str, str]:
        """MLflow params: every component's settings, flattened (paths left out), and each component's key."""
        tree = {"seed": self.options.seed, "readout_cache": self.options.readout_cache,
                **{group: plain(c) for group, c in self.components().items()}}
        tree["model"]["dtype_resolved"] = str(self.model.torch_dtype).replace("torch.", "")
        return {**flatten(tree), **{f"key.{group}": key for group, key in self.keys().items()}}

    # -- how it is named ----------------------------------------------------------------------------------------
    def labels(self) -> Labels:
        extras = []
        fs = self.first_stage
        if fs.label() != "BM25":
            extras.append({"group": "first_stage", "text": fs.label(), "without": {}})
        p = self.prompt
        if p.name not in ("core", "shuffled"):
            extras.append({"group": "prompt", "text": f"prompt={p.name}" + (f"/{self.model.template}" if p.families else ""),
                           "without": {}})
        for group, comp in (("truncation", self.cut), ("fusion", self.fusion), ("scoring", self.scoring)):
            text = comp.label()
            if text:
                extras.append({"group": group, "text": text, "without": {s: comp.label(frozenset({s})) for s in comp.settings()}})
        order = p.doc_order.label()
        if order:
            extras.append({"group": "prompt", "text": order, "without": {}})
        det = self.detection
        if self.heads.needs_detection:  # where the heads come from changes the numbers: named unless the default set
            defaults = declarations(type(det))
            differs = {k: v for k, v in det.settings().items() if k not in ("name", "split", *LOCATION_KEYS)
                       and v != defaults[k].default}

            def detection_text(hide: str = "") -> str:
                shown = [f"{k}={'null' if v is None else v}" for k, v in differs.items() if k != hide]
                if det.folds:
                    return "in-domain CV" if hide == "folds" else f"{det.folds}-fold CV"
                return f"detected on {det.name}" + (f" ({', '.join(shown)})" if shown else "")

            if det.judged or detection_text() != f"detected on {DEFAULT_DETECTION}":
                extras.append({"group": "detection", "text": detection_text(),
                               "without": {k: detection_text(k) for k in differs}})
        dtype = str(self.model.torch_dtype).replace("torch.", "")
        if dtype != "float32":  # the reference precision; bf16/fp16 runs are named so
            extras.append({"group": "model", "text": DTYPE_LABELS.get(dtype, dtype), "without": {}})
        heads, tau = self.heads, self.model.tau
        return Labels(self.model.name, heads.label(model_tau=tau), fs.label(), self.data.name, extras,
                      {s: heads.label(frozenset({s}), model_tau=tau) for s in heads.settings()})

    def run_name(self) -> str:
        """What it computes (Labels) plus the swept settings it computes with that the name does not already show; a
        setting its component ignores (heads.seed for ICR) is left out."""
        if self.tracking.run_name:
            return self.tracking.run_name
        settings = {group: c.settings() for group, c in self.components().items()}
        varying = {}
        for item in self.context.overrides:
            key, _, value = item.partition("=")
            bare = key.lstrip("+~").replace("/", ".")
            group, _, rest = bare.partition(".")
            if bare not in self.context.swept and key.lstrip("+~") not in self.context.swept:
                continue
            if bare.startswith(_NAME_NOISE) or bare.endswith(_NAME_NOISE_SUFFIX):
                continue
            if group in settings and rest and rest.split(".")[0] not in settings[group]:
                continue  # a setting this job's component does not take
            varying[bare] = value
        return self.labels().run_name(varying)

    def request(self) -> RunRequest:
        """What the tracker needs to claim, name and describe this job's run."""
        tags = {"overrides": " ".join(self.context.overrides), **self.labels().as_tags(), **provenance_tags()}
        return RunRequest(self.identity(), self.run_name(), tags, self.params(), self.config_text, self.context.parent_run_id,
                          pinned_name=bool(self.tracking.run_name))

    # -- what it will do ----------------------------------------------------------------------------------------
    def plan(self) -> dict[str, Any]:
        """Data set, queries, candidates, method, head count, truncation and detection: `dry_run=true` prints it."""
        ds = self.data.load()
        qids = self.data.queries(ds)
        detection = None
        if self.heads.needs_detection:
            det = self.detection
            if det.judged:  # the re-ranking prompts of judged queries (components/judged.py)
                detection = {"data": self.data.name if det.folds else det.name, "instances": "judged re-ranking prompts",
                             "queries": "the other folds' queries" if det.folds else det.num_queries or "every judged query",
                             "folds": det.folds}
            else:
                detection = {"data": det.name, "queries": det.num_queries, "negatives": det.num_negatives,
                             "positions": det.positions, "instances": det.num_queries * det.positions, "fold": det.fold,
                             "max_words": det.max_words if det.max_words is not None else self.prompt.max_words}
        return {
            "run_name": self.run_name(),
            "model": self.model.name,
            "dataset": self.data.name,
            "queries": len(qids),
            "first_stage": self.first_stage.name,
            "depth": int(self.first_stage.depth),
            "method": self.labels().method_label(),
            "heads": {"name": self.heads.name, **self.heads.settings()},
            "tau": self.heads.temperature(self.model.tau),
            "truncation": {"name": self.cut.name, **self.cut.settings()},
            "fusion": {"name": self.fusion.name, **self.fusion.settings()},
            "scoring": self.scoring.settings(),
            "prompt": self.prompt.name,
            "max_words": self.prompt.max_words,
            "doc_order": self.prompt.doc_order.name,
            "detection": detection,
            "dtype": self.model.dtype,
            "device": self.model.device,
            "ignored": list(self.ignored),
        }


def validate(components: dict[str, Any]) -> None:
    """Check every built component's settings (nested strategies included) against their declarations; raise one
    CorexpError naming the setting, the value and what is allowed. The group "" holds the top-level RunOptions."""
    for group, component in components.items():
        _check_component(group.replace("/", "."), component)


def _check_component(prefix: str, component: Any) -> None:
    for key, d in declarations(type(component)).items():
        value = getattr(component, key)
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Component):
            _check_component(dotted, value)
            continue
        msg = problem(dotted, value, d.rule)
        if msg:
            raise CorexpError(msg)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in (tree.items() if isinstance(tree, dict) else []):
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


def _paths(cfg: DictConfig) -> Paths:
    from omegaconf.errors import InterpolationResolutionError

    try:
        output = cfg.paths.output_dir
    except InterpolationResolutionError:  # ${hydra:runtime.output_dir} outside a Hydra run (Python API, tests)
        output = None
    return Paths(root_dir=str(cfg.paths.root_dir), cache_dir=str(cfg.paths.cache_dir), output_dir=output,
                 data_dir=cfg.paths.get("data_dir"))


def _config_text(cfg: DictConfig) -> str:
    """The resolved config as YAML (paths.output_dir left unresolved outside a Hydra run)."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    node = OmegaConf.create(tree)
    if _paths(cfg).output_dir is None:
        node.paths.output_dir = None
    return OmegaConf.to_yaml(node, resolve=True)
