"""How a run is named in the store and labelled in reports, from its components' keys (corexp.tracking.identity.RunKey)
alone: the model, the method (its head selector's label), every other component whose label is not empty (truncation,
fusion, scoring, document order, the prompt when not the default, the detection data when not the default set, a
precision other than fp32) and the data set. The report derives its labels from the keys a run logged, so a label
always says what its numbers were computed with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from corexp.settings import Component, declarations
from corexp.tracking.identity import RunKey

DEFAULT_DETECTION = "scifact-train-sample"  # detection=default: not named
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16"}
# Settings a run name always shows (a swept value of them is not repeated after the name).
ALWAYS_SHOWN = frozenset({"model", "model.name", "data", "data.name", "heads", "truncation", "fusion", "first_stage",
                          "prompt", "prompt.name", "prompt.doc_order", "model.dtype", "scoring.calibration"})


@dataclass(frozen=True)
class Extra:
    """One component's part of a label: its text, and its text without each of its settings (sweep figures)."""

    group: str
    text: str
    without: dict[str, str] = field(default_factory=dict)


def _detection_extra(det: Component) -> Extra | None:
    """Where detected heads come from, unless the default set: `detected on scifact-train (fold=0)`, `5-fold CV`."""
    defaults = declarations(type(det))
    differs = {k: v for k, v in det.settings().items() if k not in ("name", "split") and not defaults[k].location
               and v != defaults[k].default}

    def text(hide: str = "") -> str:
        shown = [f"{k}={'null' if v is None else v}" for k, v in differs.items() if k != hide]
        if det.folds:  # type: ignore[attr-defined]
            return "in-domain CV" if hide == "folds" else f"{det.folds}-fold CV"  # type: ignore[attr-defined]
        return f"detected on {det.name}" + (f" ({', '.join(shown)})" if shown else "")

    if not det.judged and text() == f"detected on {DEFAULT_DETECTION}":  # type: ignore[attr-defined]
        return None
    return Extra("detection", text(), {k: text(k) for k in differs})


def extras(key: RunKey) -> list[Extra]:
    """The label's parts besides the model, the method and the data set, in the order names show them."""
    c = key.components()
    out = []
    if c["first_stage"].label() != "BM25":
        out.append(Extra("first_stage", c["first_stage"].label()))
    prompt, model = c["prompt"], c["model"]
    if prompt.name not in ("core", "shuffled"):
        out.append(Extra("prompt", f"prompt={prompt.name}" + (f"/{model.template}" if prompt.families else "")))  # type: ignore[attr-defined]
    for group in ("truncation", "fusion", "scoring"):
        text = c[group].label()
        if text:
            out.append(Extra(group, text, {s: c[group].label(frozenset({s})) for s in c[group].settings()}))
    order = prompt.doc_order.label()  # type: ignore[attr-defined]
    if order:
        out.append(Extra("prompt", order))
    detection = _detection_extra(c["detection"]) if "detection" in c else None
    if detection:
        out.append(detection)
    if model.dtype != "float32":  # type: ignore[attr-defined]  # the reference precision; bf16/fp16 runs are named so
        out.append(Extra("model", DTYPE_LABELS.get(model.dtype, model.dtype)))  # type: ignore[attr-defined]
    return out


def method(key: RunKey, hide: str | None = None) -> str:
    """The head selector's label (`CoRe-k8 τ=0.1`), without the setting `hide`."""
    return key["heads"].label(frozenset({hide}) if hide else frozenset())


def method_label(key: RunKey, hide_group: str | None = None, hide_setting: str | None = None) -> str:
    """`CoRe-k8 τ=0.1 [dense:minilm, trunc=auto, fusion=rrf]`: a report row (a first stage other than BM25 shown, so
    re-rankings of two first stages are two rows). hide_*: the swept setting of a sweep figure."""
    heads = method(key, hide_setting if hide_group == "heads" else None)
    parts = [(e.without.get(hide_setting or "", e.text) if e.group == hide_group else e.text) for e in extras(key)]
    parts = [p for p in parts if p]
    return heads + (f" [{', '.join(parts)}]" if parts else "")


def swept_settings(key: RunKey, overrides: Sequence[str], swept: Sequence[str]) -> dict[str, str]:
    """The swept overrides that change what the run computes: settings of its computing components (not locations,
    not a setting its component does not take, such as heads.seed for ICR), as `group.setting` -> value."""
    c = key.components()
    out = {}
    for item in overrides:
        name, _, value = item.partition("=")
        bare = name.lstrip("+~").replace("/", ".")
        if bare not in swept and name.lstrip("+~") not in swept:
            continue
        group, _, rest = bare.partition(".")
        if group not in c:
            continue  # not a computing component: where a job reads or writes, how it reports
        own = declarations(type(c[group]))
        setting = rest.split(".")[0]
        if rest and (setting not in own or own[setting].location):
            continue
        out[bare] = value
    return out


def run_name(key: RunKey, varying: dict[str, str] | None = None) -> str:
    """`smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample`, plus any swept setting it does not already show."""
    c, parts = key.components(), extras(key)
    heads = method(key)
    shown = set(ALWAYS_SHOWN)
    shown |= {f"heads.{s}" for s in c["heads"].settings() if method(key, s) != heads}
    shown |= {f"{e.group}.{s}" for e in parts for s, text in e.without.items() if text != e.text}
    swept = [f"{k}={v}" for k, v in sorted((varying or {}).items()) if k not in shown]
    return " · ".join([c["model"].name, heads, *[e.text for e in parts], c["data"].name, *swept])


def tags(key: RunKey) -> dict[str, str]:
    """The run's tags that show what it computes in the MLflow UI (the report reads the keys, never these)."""
    c = key.components()
    return {"model": c["model"].name, "method": method(key), "first_stage_label": c["first_stage"].label() or "",
            "dataset": c["data"].name, "method_label": method_label(key)}
