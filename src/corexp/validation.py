"""Every setting with a valid range or a fixed set of values, checked once before any model or data is loaded.

`RULES` is the one table of allowed values (the README's config table lists it). It is applied twice, from the same
rules: to the command-line overrides before Hydra composes anything (so a wrong type such as `data.max_queries=abc`
ends in corexp's one line, not in Hydra's multi-line composition report), and to the composed config at the start
of every job (values from experiment files and interpolations). `null` keeps its documented meaning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from corexp.errors import CorexpError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Rule:
    kind: str  # int | float | enum | device | bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    null: str | None = None  # what null means, when null is allowed

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.null is not None
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind in ("enum", "device"):
            return isinstance(v, str) and (v in self.choices if self.kind == "enum" else bool(DEVICE_RE.match(v)))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind == "int" and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def allowed(self) -> str:
        if self.kind == "enum":
            text = "one of " + ", ".join(self.choices)
        elif self.kind == "device":
            text = "auto, cpu, mps, cuda or cuda:N"
        elif self.kind == "bool":
            text = "true or false"
        else:
            noun = "an integer" if self.kind == "int" else "a finite number"
            if self.lo is not None and self.hi is not None:
                text = f"{noun} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
            elif self.lo is not None:
                text = f"{noun} {'>' if self.lo_open else '>='} {_num(self.lo)}"
            else:
                text = noun
        return f"null ({self.null}) or {text}" if self.null else text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _int(lo: int = 1, null: str | None = None, hi: int | None = None) -> Rule:
    return Rule("int", lo=lo, hi=hi, null=null)


def _enum(*choices: str) -> Rule:
    return Rule("enum", choices=choices)


RULES: dict[str, Rule] = {
    "seed": _int(0),
    "data.max_queries": _int(1, null="all queries"),
    "first_stage.source": _enum("auto", "run", "bm25", "dense", "hybrid"),
    "first_stage.depth": _int(1),
    "first_stage.hits": _int(1),
    "first_stage.k1": Rule("float", lo=0),
    "first_stage.b": Rule("float", lo=0, hi=1),
    "first_stage.method": _enum("lucene", "robertson", "atire", "bm25l", "bm25+"),
    "first_stage.rrf_k": _int(1),
    "first_stage.chunk_size": _int(1),
    "first_stage.encoder.batch_size": _int(1),
    "first_stage.encoder.max_seq_length": _int(1, null="the model's own"),
    "first_stage.encoder.doc_field": _enum("title_text", "text"),
    "first_stage.encoder.device": Rule("device"),
    "model.dtype": _enum("auto", "bfloat16", "float32", "float16"),
    "model.device": Rule("device"),
    "model.template": _enum("auto", "mistral", "llama3", "granite", "chatml", "phi4", "plain"),
    "model.max_context": _int(1, null="the model config's max_position_embeddings"),
    "model.tau": Rule("float", lo=0, lo_open=True),
    "prompt.max_words": _int(1, null="whole documents"),
    "prompt.doc_order": _enum("retriever", "reversed", "shuffled"),
    "prompt.doc_field": _enum("text", "title_text", "title_newline_text"),
    "prompt.doc_span": _enum("text", "marker_text", "space_text"),
    "prompt.doc_span_extra_tokens": _int(0),
    "prompt.query_span_end": _enum("query", "prompt_end", "suffix_first_token"),
    "prompt.word_split": _enum("whitespace", "space"),
    "prompt.span_rule": _enum("offsets", "core_incremental", "icr_incremental"),
    "prompt.strip_text": _enum("none", "before_cut", "after_cut"),
    "prompt.detection_doc_span_extra_tokens": _int(0, null="prompt.doc_span_extra_tokens"),
    "prompt.overflow": _enum("reduce", "error"),
    "prompt.instruction_style": _enum("fixed", "auto"),
    "prompt.seed": _int(0),
    "heads.metric": _enum("all", "core", "qrhead", "random", "published"),
    "heads.k": _int(1),  # the upper bound (layers x heads) is checked against the model's config before loading it
    "heads.tau": Rule("float", lo=0, lo_open=True, null="the model's tau"),
    "heads.seed": _int(0),
    "truncation.mode": _enum("none", "auto", "fraction", "layers"),
    "truncation.fraction": Rule("float", lo=0, hi=1, hi_open=True),
    "truncation.layers": _int(1, null="unset; needed by truncation=layers"),
    "detection.num_queries": _int(1),
    "detection.num_negatives": _int(1),
    "detection.positions": _int(1),  # and at most num_negatives + 1 (checked below)
    "detection.max_words": _int(1, null="prompt.max_words"),
    "detection.seed": _int(0),
    "detection.fold": _int(0, null="num_queries sampled, no folds"),
    "fusion.mode": _enum("none", "linear", "rrf"),
    "fusion.alpha": Rule("float", lo=0, hi=1),
    "fusion.rrf_k": _int(1),
}


# Fields a head metric never reads: jobs that differ only in them compute the same thing (one config hash), and a
# value given for them on the command line is reported (ICR has no k; QRHead has no temperature).
UNUSED_BY_METRIC = {
    "all": ("k", "tau", "seed"),
    "published": ("tau", "seed"),
    "random": ("tau",),
    "qrhead": ("tau", "seed"),
    "core": ("seed",),
}


def ignored_overrides(cfg: Any, overrides: list[str]) -> list[str]:
    """Warnings for settings the user gave that the chosen method ignores (e.g. heads.k with heads=all)."""
    metric = cfg.heads.metric
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    out = [f"heads.{f}={cfg.heads[f]} is ignored by heads={metric}"
           + (" (ICR uses every head; heads=core, qrhead or random take a top-k)" if metric == "all" else "")
           for f in UNUSED_BY_METRIC.get(metric, ()) if f"heads.{f}" in given]
    if metric == "all" and "truncation" in given and cfg.truncation.mode == "auto":
        out.append("truncation=auto keeps every layer with heads=all")
    return out


def problem(key: str, value: Any) -> str | None:
    """The one-line complaint about `key=value`, or None when it is allowed (or not a checked setting)."""
    rule = RULES.get(key)
    if rule is None or rule.ok(value):
        return None
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) \
        if isinstance(value, str) else str(value)
    return f"{key}={shown} is not allowed: use {rule.allowed()}"


def check_overrides(args: list[str]) -> str | None:
    """Check command-line overrides (every value of a sweep) before Hydra composes the config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report
        return None
    for o in overrides:
        key = o.key_or_group.lstrip("+~")
        if key not in RULES or o.is_delete():
            continue
        try:
            values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        except Exception:  # noqa: BLE001 - glob sweeps and the like: checked per job instead
            continue
        for v in values:
            msg = problem(key, v)
            if msg:
                return msg
    return None


def validate(cfg: Any) -> None:
    """Check the composed config; raise one CorexpError naming the setting, the value and what is allowed."""
    from omegaconf import OmegaConf

    missing = object()
    for key in RULES:
        value = OmegaConf.select(cfg, key, default=missing)
        if value is missing:
            continue
        msg = problem(key, value)
        if msg:
            raise CorexpError(msg)
    det = cfg.get("detection")
    if det is not None and det.positions > det.num_negatives + 1:
        raise CorexpError(f"detection.positions={det.positions} is not allowed: use 1..{det.num_negatives + 1} "
                          f"(detection.num_negatives + 1 slots)")
    if cfg.truncation.mode == "layers" and cfg.truncation.get("layers") is None:
        raise CorexpError("truncation.layers=null is not allowed with truncation=layers: use an integer >= 1")


def check_model_dims(cfg: Any, n_layers: int, n_heads: int) -> None:
    """Settings whose upper bound is the model's size, checked from its config before any weight is loaded."""
    if cfg.heads.metric != "all" and cfg.heads.k > n_layers * n_heads:
        raise CorexpError(f"heads.k={cfg.heads.k} is out of range: choose 1..{n_layers * n_heads} (heads available)")
    if cfg.truncation.mode == "layers" and cfg.truncation.layers > n_layers:
        raise CorexpError(f"truncation.layers={cfg.truncation.layers} is not allowed: use 1..{n_layers} (model layers)")


def settings_table() -> list[tuple[str, str]]:
    """(setting, allowed values) rows for the README."""
    return [(key, rule.allowed()) for key, rule in RULES.items()]
