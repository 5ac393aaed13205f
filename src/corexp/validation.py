"""Every setting checked against its declaration (corexp.settings), at the door, before any model or data is loaded.

The rules are the declarations of the classes the config groups build (corexp.config.declared). `check_overrides`
applies them to the command-line overrides (every value of a sweep) before Hydra composes anything: unknown groups,
options and keys (with or without `+`) and values a rule does not allow each end in one corexp line with the valid
ones. The built components of every job are checked by `corexp.job.validate` (values from experiment files and
interpolations). `python -m corexp.validation --readme` writes the README's settings table.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

from corexp.config import GROUPS, declared, options
from corexp.settings import Component, Declaration, Rule, markdown_table, problem

# Keys whose values are free-form mappings (their sub-keys are data, not settings).
MAPPINGS = ("model.gguf", "model.published_heads", "prompt.families", "first_stage.encoder.wheel")


def _dotted(group: str) -> str:
    return group.replace("/", ".")


@functools.cache
def rules() -> dict[str, Rule]:
    """dotted key -> rule, for every checkable setting (a setting declared by several options has one rule)."""
    return {key: found[0][1].rule for key, found in declared().items() if found[0][1].rule.kind != "any"}


@functools.cache
def group_choices() -> dict[str, list[str]]:
    """Config group -> its options (conf/<group>/*.yaml), without internal files (`_base`, `_beir`)."""
    from corexp.locations import config_dir

    root = config_dir()
    out = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        group = folder.relative_to(root).as_posix()
        if group.startswith("hydra"):
            continue
        names = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
        if names:
            out[group] = names
    return out


@functools.cache
def known_keys() -> set[str]:
    return set(declared()) | {_dotted(g) for g in group_choices()}


def _near(key: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_key(key: str) -> str | None:
    """The complaint about a dotted key that is no setting (with or without Hydra's `+`), or None."""
    known = known_keys()
    if key in known or key.split(".")[0] == "hydra" or any(key.startswith(m + ".") for m in MAPPINGS):
        return None
    group, dot, _ = key.rpartition(".")
    if dot and group in {_dotted(g) for g in group_choices()}:
        siblings = sorted({k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group})
        return f"{key} is not a setting{_near(key, known)}; {group} settings: {', '.join(siblings)}"
    top = sorted(k for k in known if "." not in k)
    return f"{key} is not a setting{_near(key, known)}; top-level settings and groups: {', '.join(top)}"


def _values(o: Any) -> list[Any]:
    try:
        return list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
    except Exception:
        return []


def check_overrides(args: list[str]) -> str | None:
    """Check command-line overrides (every value of a sweep) before Hydra composes the config; the complaint or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from corexp.config import normalize_overrides

    candidates = [a for a in normalize_overrides(args) if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception as err:
        first = (str(err).strip().splitlines() or ["syntax error"])[0]
        return f"cannot read the overrides {' '.join(candidates)}: {first}"
    table, choices = rules(), group_choices()
    for o in overrides:
        key = o.key_or_group.lstrip("+~")
        if key.startswith("hydra"):
            continue
        if key in choices or "/" in key:  # a group choice: model=smollm2, prompt/doc_order=reversed
            shown = key.replace("/", ".") if key.startswith("prompt/") else key  # as the README spells it
            if key not in choices:
                return f"{key} is not a config group; groups: {', '.join(sorted(choices))}"
            for v in [] if o.is_delete() else _values(o):
                if v is not None and str(v) not in choices[key]:
                    return f"{shown}={v} is not an option{_near(str(v), set(choices[key]))}; choose one of {', '.join(choices[key])}"
            continue
        group, dot, field = key.partition(".")
        if group in GROUPS and dot and "." not in field and f"{group}.{field}" not in declared():
            known = sorted({k.partition(".")[2] for k in declared() if k.startswith(group + ".") and k.count(".") == 1})
            return (f"{key} is not a setting of any {group} option{_near(field, set(known))} ({', '.join(known) or 'none'}); "
                    f"options: {', '.join(options(group))}")
        complaint = _unknown_key(key)
        if complaint:
            return complaint
        if key in table and not o.is_delete():
            for v in _values(o):
                msg = problem(key, v, table[key])
                if msg:
                    return msg
    return None


def default_values() -> dict[str, Any]:
    """dotted key -> the value the default job (`python -m corexp`) runs with, for every setting it has. A value the
    config derives by interpolation (a path under the checkout or the cache) is shown as written, not as this
    machine resolves it, so the README's table is the same in every clone."""
    from omegaconf import OmegaConf

    from corexp.config import components_of, compose_config
    from corexp.settings import plain

    cfg = compose_config([])
    raw = OmegaConf.to_container(cfg, resolve=False)
    components, opts, _ = components_of(cfg, resolved=False)  # as configured (auto, null), not as resolved here
    out: dict[str, Any] = {}

    def as_written(key: str) -> Any:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node if isinstance(node, str) and "${" in node else None

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Component):
                walk(f"{prefix}{f.name}.", value)
            else:
                key = f"{prefix}{f.name}"
                written = as_written(key)
                out[key] = written if written is not None else plain(value)

    walk("", opts)
    for group, component in components.items():
        walk(f"{_dotted(group)}.", component)
    return out


def settings_tables() -> str:
    """The README's settings table: every setting with its allowed values, the value the default job runs with (or,
    for options the default job does not use, each option's own default) and its description."""
    defaults = default_values()
    rows = []
    for key, found in sorted(declared().items(), key=lambda kv: (kv[0].count(".") > 0, kv[0])):
        if key.startswith("paths."):
            continue  # derived from COREXP_ROOT / COREXP_CACHE / COREXP_DATA_DIR (README, "Where things go")
        d = found[0][1]
        owners = [owner for owner, _ in found]
        where = "" if len(found) == 1 and "=" not in owners[0] else \
            f" ({'; '.join(owners)})" if len(owners) < 4 else ""
        if key in defaults:
            default = defaults[key]
        elif len({repr(x.default) for _, x in found}) == 1:
            default = d.default
        else:
            default = ", ".join(f"{owner.split('=')[-1]}: {x.default}" for owner, x in found)
        rows.append((key, Declaration(key, d.rule, default, d.doc + where)))
    return markdown_table(rows)


README_MARKERS = ("<!-- settings:start (generated: python -m corexp.validation --readme) -->", "<!-- settings:end -->")


def main(argv: list[str] | None = None) -> int:
    """Print the settings table, or (--readme) rewrite it in the README between its markers."""
    import argparse
    from pathlib import Path

    from corexp.locations import project_root

    ap = argparse.ArgumentParser(prog="python -m corexp.validation", description=main.__doc__)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args(argv)
    tables = settings_tables()
    if not args.readme:
        print(tables)
        return 0
    path = Path(project_root()) / "README.md"
    text = path.read_text()
    start, end = text.index(README_MARKERS[0]) + len(README_MARKERS[0]), text.index(README_MARKERS[1])
    path.write_text(text[:start] + "\n\n" + tables + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
