"""A job as typed objects, built once at the door (`Job.from_config`: corexp.config builds, checks and resolves every
group); below it nothing reads the DictConfig. Its run's identity, params, name and labels follow from its components'
keys (corexp.tracking.identity.RunKey, corexp.tracking.names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from corexp.callbacks import RunContext
from corexp.components.detection import Detection
from corexp.components.first_stage import FirstStage
from corexp.components.fusion import Fusion
from corexp.components.heads import HeadSelector
from corexp.components.truncation import Truncation
from corexp.config import Paths, RunOptions, components_of, config_text, paths_of
from corexp.data.datasets import DataSource
from corexp.data.evaluation import parse_measures
from corexp.engine.models import ModelSpec
from corexp.engine.prompt import PromptSpec
from corexp.engine.scoring import Scoring
from corexp.tracking import names
from corexp.tracking.identity import COMPUTING, Identity, RunKey, code_digest, location_params, provenance_tags
from corexp.tracking.tracker import RunRequest, TrackingSpec


@dataclass(frozen=True)
class Job:
    """Every component of one job, built, checked and resolved (corexp.config.resolve); what it computes follows."""

    options: RunOptions
    paths: Paths
    model: ModelSpec
    data: DataSource
    prompt: PromptSpec
    heads: HeadSelector
    first_stage: FirstStage
    truncation: Truncation
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
        """The door: build every group from its `_target_`, check and resolve every setting, read Hydra's context."""
        c, options, ignored = components_of(cfg)
        return cls(options=options, paths=paths_of(cfg), measures=tuple(parse_measures(list(c["data"].measures))),
                   ignored=ignored, context=RunContext.current(), config_text=config_text(cfg), **c)

    def components(self) -> dict[str, Any]:
        return {g: getattr(self, g) for g in (*COMPUTING, "tracking")}

    def run_key(self) -> RunKey:
        """The keys of the components it computes with (detection only for selectors that detect) and its seed."""
        return RunKey.of({g: getattr(self, g) for g in COMPUTING if g != "detection" or self.heads.needs_detection},
                         self.options.seed)

    def identity(self) -> Identity:
        content = {"data": self.data.fingerprint(self.paths.cache)}
        if self.heads.needs_detection:
            content["detection"] = self.detection.fingerprint(self.paths.cache)
        return self.run_key().identity(content, code_digest())

    def run_name(self) -> str:
        key, ctx = self.run_key(), self.context
        return self.tracking.run_name or names.run_name(key, names.swept_settings(key, ctx.overrides, ctx.swept))

    def request(self) -> RunRequest:  # what the tracker needs to claim, name and describe this job's run
        key = self.run_key()
        tags = {"overrides": " ".join(self.context.overrides), **names.tags(key), **provenance_tags()}
        params = {**key.params(), **location_params(self.components()), "readout_cache": str(self.options.readout_cache)}
        return RunRequest(self.identity(), self.run_name(), tags, params, self.config_text, self.context.parent_run_id,
                          pinned_name=bool(self.tracking.run_name))
