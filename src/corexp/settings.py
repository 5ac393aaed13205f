"""One declaration per setting: its type, allowed values or range, default and a one-line description; and the
`Component` base of every object built from a config group (its settings are its declared dataclass fields).

Every user setting is a field of a dataclass declared with `setting(...)`: the structured schemas of config.py (model,
data, prompt, detection, tracking, encoder, the job's top level) and the component classes that Hydra instantiates
(heads, first_stage, truncation, fusion options; the corexp.components package). The command-line pre-check, the check
of the composed config and the README's "Settings" table are all generated from these declarations, the way
ir_measures declares the parameters of its measures.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Rule:
    """What values a setting allows. kind: int | float | str | bool | device | any (not checked: lists, mappings)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    null: str | None = None  # what null means, when null is allowed

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.null is not None or self.kind == "any"
        if self.kind == "any":
            return True
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "str":
            return isinstance(v, str) and (not self.choices or v in self.choices)
        if self.kind == "device":
            return isinstance(v, str) and bool(DEVICE_RE.match(v))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind == "int" and not isinstance(v, int)):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def allowed(self) -> str:
        if self.kind == "str":
            text = "one of " + ", ".join(self.choices) if self.choices else "a string"
        elif self.kind == "device":
            text = "auto, cpu, mps, cuda or cuda:N"
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "any":
            text = "see the description"
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


def setting(default: Any = _NO_DEFAULT, *, doc: str, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, choices: tuple[str, ...] = (), null: str | None = None,
            device: bool = False, factory: Any = None, location: bool = False) -> Any:
    """A dataclass field that carries its rule and description (the type comes from the field's annotation).
    location: the setting says where data is read from, not what is computed (the content fingerprint stands for it
    in a run's identity): left out of the component's key."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices), "null": null, "device": device,
            "location": location}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"corexp": meta})
    if default is _NO_DEFAULT:
        return dataclasses.field(metadata={"corexp": meta})
    return dataclasses.field(default=default, metadata={"corexp": meta})


@dataclass(frozen=True)
class Declaration:
    name: str
    rule: Rule
    default: Any
    doc: str
    location: bool = False


def _kind(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 else annotation
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(base, "any")


def declarations(cls: type) -> dict[str, Declaration]:
    """The declared settings of a schema or component class, in field order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("corexp")
        if meta is None:
            continue
        kind = "device" if meta["device"] else _kind(hints[f.name])
        lo = meta["gt"] if meta["gt"] is not None else meta["ge"]
        hi = meta["lt"] if meta["lt"] is not None else meta["le"]
        rule = Rule(kind, lo=lo, hi=hi, lo_open=meta["gt"] is not None, hi_open=meta["lt"] is not None,
                    choices=meta["choices"], null=meta["null"])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        out[f.name] = Declaration(f.name, rule, default, meta["doc"], meta["location"])
    return out


def problem(key: str, value: Any, rule: Rule) -> str | None:
    """The one-line complaint about `key=value`, or None when the rule allows it."""
    if rule.ok(value):
        return None
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) \
        if isinstance(value, str) else str(value)
    return f"{key}={shown} is not allowed: use {rule.allowed()}"


def markdown_table(rows: list[tuple[str, Declaration]]) -> str:
    """| setting | allowed | default | description | rows for the README."""
    lines = ["| setting | allowed | default | description |", "| --- | --- | --- | --- |"]
    for key, d in rows:
        default = "null" if d.default is None else str(d.default).lower() if isinstance(d.default, bool) else d.default
        if isinstance(default, str) and default not in ("null",) and d.rule.kind == "str" and "\n" in default:
            default = repr(default)
        lines.append(f"| `{key}` | {d.rule.allowed()} | `{default}` | {d.doc} |")
    return "\n".join(lines)


_KEYED: dict[str, type] = {}  # key name -> component class (every subclass of Component, registered on definition)


class Component:
    """Base of every component built at the door from a config group's `_target_` (a frozen dataclass whose fields are
    declared with `setting`). `name` is its option (the YAML file's stem); nested components (a prompt's span rule,
    a dense first stage's encoder) are fields holding components.

    Its **key** is ir_measures' idea of a measure's repr: `CoRe(k=4,tau=0.05)`, `Window(width=3)`, `BM25(depth=50)` —
    the key name and every setting that differs from its declared default, nested components as their keys, where data
    is read from (`location` settings) left out. The key names what the component computes and parses back into it
    (`parse_key`); run identities, params, run names and report labels all derive from keys (corexp.tracking)."""

    name: typing.ClassVar[str] = ""
    key_name: typing.ClassVar[str] = ""  # the key's name (default: the class name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _KEYED[cls.__dict__.get("key_name") or cls.__name__] = cls

    def key(self) -> str:
        """`Name(setting=value,...)`: the settings that differ from their defaults, in declaration order (locations
        left out: `parse_key(c.key()) == c.unlocated()`)."""
        parts = [f"{name}={_key_value(getattr(self, name))}" for name, d in declarations(type(self)).items()
                 if getattr(self, name) != d.default and not d.location]
        return f"{type(self).__dict__.get('key_name') or type(self).__name__}({','.join(parts)})"

    def unlocated(self) -> Component:
        """The component without where its data is read from (what its key names)."""
        loc = {name: d.default for name, d in declarations(type(self)).items() if d.location}
        return dataclasses.replace(self, **loc) if loc else self  # type: ignore[type-var]

    def settings(self) -> dict[str, Any]:
        """Its settings' values as plain data (what it computes with): logged as params, part of the run identity.
        A nested component shows as {"name": its option, **its settings}."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def label(self, hide: frozenset[str] = frozenset()) -> str | None:
        """How run names and report rows show it (None: nothing to show); `hide` leaves out those settings' values."""
        return None

    def check(self) -> None:
        """Constraints between its settings (each setting's own rule is checked from its declaration)."""


def plain(value: Any) -> Any:
    """A setting's value as JSON-able data (nested components as {"name", settings}, containers copied)."""
    if isinstance(value, Component):
        return {"name": value.name, **value.settings()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _key_value(value: Any) -> str:
    if isinstance(value, Component):
        return value.key()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_key_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_key_value(k)}:{_key_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def parse_key(text: str) -> Component:
    """The component a key names (`Component.key`): `parse_key(c.key()) == c.unlocated()` for every component."""
    import ast

    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if not isinstance(node, ast.Call):
        raise ValueError(f"'{text}' is not a component key (Name(setting=value,...))")
    return _build(node, text)


def _build(node: Any, text: str) -> Any:
    import ast

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        cls = _KEYED.get(node.func.id)
        if cls is None or node.args:
            raise ValueError(f"'{text}': no component is keyed '{node.func.id}'")
        own = declarations(cls)
        unknown = [kw.arg for kw in node.keywords if kw.arg not in own]
        if unknown:
            raise ValueError(f"'{text}': {node.func.id} has no setting '{unknown[0]}' ({', '.join(own)})")
        return cls(**{kw.arg: _build(kw.value, text) for kw in node.keywords})
    if isinstance(node, ast.List):
        return [_build(v, text) for v in node.elts]
    if isinstance(node, ast.Dict):
        return {_build(k, text): _build(v, text) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)
