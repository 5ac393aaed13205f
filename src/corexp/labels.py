"""Readable names for what a run computes: one vocabulary for MLflow run names and report rows.

Both work on the flattened config (`heads.metric`, `truncation.mode`, ...), i.e. the params MLflow stores.
"""

from __future__ import annotations

from typing import Any

METHOD_NAMES = {"all": "ICR", "core": "CoRe", "qrhead": "QRHead", "random": "random", "published": "published"}


def _missing(value: Any) -> bool:
    return value in (None, "None", "null", "")


def method_name(p: dict[str, Any]) -> str:
    """ICR | CoRe-k8 τ=0.1 | QRHead-k16 | random-k8 | published-k8."""
    metric = p.get("heads.metric", "all")
    name = METHOD_NAMES.get(metric, metric)
    if metric != "all":
        name += f"-k{p.get('heads.k')}"
    if metric == "core":
        tau = p.get("heads.tau")
        name += f" τ={p.get('model.tau') if _missing(tau) else tau}"
    return name


def method_extras(p: dict[str, Any]) -> list[str]:
    """What else changes the computation: truncation, document order, fusion, first stage, prompt preset."""
    extras = []
    mode = p.get("truncation.mode", "none")
    if mode != "none":
        extras.append(f"trunc={mode}" + (f":{p.get('truncation.fraction')}" if mode == "fraction" else
                                         f":{p.get('truncation.layers')}" if mode == "layers" else ""))
    if p.get("prompt.doc_order", "retriever") not in ("retriever", None):
        extras.append(str(p["prompt.doc_order"]))
    if p.get("fusion.mode", "none") not in ("none", None):
        extras.append(f"fusion={p['fusion.mode']}")
    return extras


def method_label(p: dict[str, Any]) -> str:
    """Report row label: `CoRe-k8 τ=0.1 [trunc=auto, fusion=rrf]`."""
    extras = method_extras(p)
    return method_name(p) + (f" [{', '.join(extras)}]" if extras else "")


def run_name(p: dict[str, Any], varying: dict[str, str] | None = None) -> str:
    """MLflow run name: `smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample`, plus any swept setting it
    does not already show (so that two jobs of one sweep never share a name)."""
    parts = [str(p.get("model.name")), method_name(p), *method_extras(p), str(p.get("data.name"))]
    shown = {"model", "heads", "heads.metric", "heads.k", "heads.tau", "truncation", "truncation.mode",
             "truncation.fraction", "truncation.layers", "prompt.doc_order", "fusion", "fusion.mode", "data", "data.name",
             "model.name"}
    for key, value in sorted((varying or {}).items()):
        if key.lstrip("+~") not in shown:
            parts.append(f"{key.lstrip('+~')}={value}")
    return " · ".join(parts)
