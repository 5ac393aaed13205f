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


def truncation_mode(metric: Any, mode: Any) -> Any:
    """The truncation a run actually had: `auto` keeps every layer when every head is used (ICR), i.e. none."""
    return "none" if mode == "auto" and metric == "all" else mode


def first_stage_label(p: dict[str, Any]) -> str:
    """BM25 (the dataset's run or bm25s) | dense:<encoder> | hybrid:<encoder>: the candidates a run re-ranked."""
    source = p.get("first_stage.source", "auto")
    if source in ("dense", "hybrid"):
        return f"{source}:{p.get('first_stage.encoder.name')}"
    return "BM25"


def method_extras(p: dict[str, Any]) -> list[str]:
    """What else changes the computation: first stage, prompt preset, truncation, document order, fusion."""
    extras = []
    if first_stage_label(p) != "BM25":
        extras.append(first_stage_label(p))
    if p.get("prompt.name", "core") not in ("core", "shuffled", None):
        extras.append(f"prompt={p['prompt.name']}" + (f"/{p['model.template']}" if str(p.get("prompt.name")).endswith("official") else ""))
    mode = truncation_mode(p.get("heads.metric", "all"), p.get("truncation.mode", "none"))
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
             "model.name", "first_stage", "first_stage.source", "prompt", "prompt.name"}
    for key, value in sorted((varying or {}).items()):
        if key.lstrip("+~") not in shown:
            parts.append(f"{key.lstrip('+~')}={value}")
    return " · ".join(parts)
