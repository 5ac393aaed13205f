"""How a run is named and labelled in the store: model, method (head selector), first stage, data set and the extras
that change the computation (corexp.job builds them from its components; the report reads them back from the run's
tags, so it never imports the job)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


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
                 "prompt.name", "prompt.doc_order", "prompt/doc_order", "model.dtype", "scoring.calibration"}
        shown |= {f"heads.{s}" for s, text in self.method_without.items() if text != self.method}
        shown |= {f"{e['group']}.{s}" for e in self.extras for s, text in e["without"].items() if text != e["text"]}
        for key, value in sorted((varying or {}).items()):
            if key not in shown:
                parts.append(f"{key}={value}")
        return " · ".join(parts)

    def as_tags(self) -> dict[str, str]:
        return {"model": self.model, "method": self.method, "first_stage_label": self.first_stage, "dataset": self.dataset,
                "method_label": self.method_label(),
                "corexp.labels": json.dumps({"method": self.method, "method_without": self.method_without,
                                             "first_stage": self.first_stage, "extras": self.extras}, ensure_ascii=False)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Labels:
        parts = json.loads(tags["corexp.labels"])
        return cls(tags.get("model", "?"), parts["method"], parts["first_stage"], tags.get("dataset", "?"), parts["extras"],
                   parts["method_without"])
