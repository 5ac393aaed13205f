"""Every setting's value checked once, against its declaration (corexp.settings), before any model or data is loaded.

The rules are the declarations: the schema dataclasses of corexp.config (model, data, prompt, detection, tracking,
encoder, the job's top level) and the component classes of the groups heads, first_stage, truncation and fusion. They
are applied to the command-line overrides (every value of a sweep) before Hydra composes anything, so that a wrong
type such as `data.max_queries=abc` is one corexp line and not Hydra's multi-line report, and to the composed config
at the start of every job (values from experiment files and interpolations). `null` keeps its documented meaning.
"""

from __future__ import annotations

import functools
from typing import Any

from corexp.components.base import GROUPS, group_settings, options
from corexp.config import SCHEMAS, JobConfig
from corexp.errors import CorexpError
from corexp.settings import Declaration, Rule, declarations, markdown_table, problem


@functools.cache
def schema_rules() -> dict[str, Declaration]:
    """dotted key -> declaration of every setting that is not a component's."""
    out = {key: d for key, d in declarations(JobConfig).items()}
    for group, cls in SCHEMAS.items():
        prefix = group.replace("/", ".")
        out.update({f"{prefix}.{key}": d for key, d in declarations(cls).items()})
    return out


@functools.cache
def rules() -> dict[str, Rule]:
    """dotted key -> rule, for every setting (a component setting declared by several options has one rule)."""
    out = {key: d.rule for key, d in schema_rules().items() if d.rule.kind != "any"}
    for group in GROUPS:
        for decls in group_settings(group).values():
            for key, d in decls.items():
                if d.rule.kind != "any":
                    out.setdefault(f"{group}.{key}", d.rule)
    return out


# Keys whose values are free-form mappings (their sub-keys are data, not settings).
MAPPINGS = ("model.gguf", "model.published_heads", "prompt.families", "first_stage.encoder.wheel")
# Top-level nodes that are not corexp settings: Hydra's own and the where-things-are of paths/.
PASSTHROUGH = ("hydra",)


@functools.cache
def group_choices() -> dict[str, list[str]]:
    """Config group -> its options (conf/<group>/*.yaml), without internal files (`_base`, `_beir`, Hydra's schema_*)."""
    from corexp.config import config_dir

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
    """Every dotted key a user may set: declared settings, group nodes, and the mapping settings' roots."""
    keys = set(schema_rules()) | {g.replace("/", ".") for g in group_choices()}
    for group in GROUPS:
        keys |= {f"{group}.{k}" for d in group_settings(group).values() for k in d}
    return keys


def _near(key: str, candidates: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_key(key: str) -> str | None:
    """The complaint about a dotted key that is no setting (with or without Hydra's `+`), or None."""
    known = known_keys()
    if key in known or key.split(".")[0] in PASSTHROUGH or any(key.startswith(m + ".") for m in MAPPINGS):
        return None
    group, dot, _ = key.rpartition(".")
    if dot and group in {g.replace("/", ".") for g in group_choices()}:
        siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group)
        return f"{key} is not a setting{_near(key, known)}; {group} settings: {', '.join(siblings)}"
    top = sorted(k for k in known if "." not in k)
    return f"{key} is not a setting{_near(key, known)}; top-level settings and groups: {', '.join(top)}"


def check_overrides(args: list[str]) -> str | None:
    """Check command-line overrides (every value of a sweep) before Hydra composes the config: unknown groups,
    options and keys (with or without `+`) and values their declarations do not allow, each in one line with the
    valid ones."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception as err:
        first = (str(err).strip().splitlines() or ["syntax error"])[0]
        return f"cannot read the overrides {' '.join(candidates)}: {first}"
    table, choices = rules(), group_choices()
    for o in overrides:
        raw = o.key_or_group
        key = raw.lstrip("+~")
        if raw.startswith("hydra") or key.startswith("hydra"):
            continue
        if key in choices or "/" in key:  # a group choice: model=smollm2, prompt/doc_order=reversed
            if key not in choices:
                return f"{key} is not a config group; groups: {', '.join(sorted(choices))}"
            if o.is_delete():
                continue
            try:
                values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
            except Exception:
                continue
            for v in values:
                if v is not None and str(v) not in choices[key]:
                    return f"{key}={v} is not an option{_near(str(v), set(choices[key]))}; choose one of {', '.join(choices[key])}"
            continue
        group, dot, field = key.partition(".")
        if group in GROUPS and dot and "." not in field and field not in {k for d in group_settings(group).values() for k in d}:
            known = sorted({k for d in group_settings(group).values() for k in d})
            return (f"{key} is not a setting of any {group} option{_near(field, set(known))} ({', '.join(known) or 'none'}); "
                    f"options: {', '.join(options(group))}")
        complaint = _unknown_key(key)
        if complaint:
            return complaint
        if key not in table or o.is_delete():
            continue
        try:
            values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        except Exception:
            continue
        for v in values:
            msg = problem(key, v, table[key])
            if msg:
                return msg
    return None


def validate(cfg: Any, components: dict[str, Any] | None = None) -> None:
    """Check the composed config (and the settings of its built components); raise one CorexpError naming the
    setting, the value and what is allowed."""
    from omegaconf import OmegaConf

    missing = object()
    for key, d in schema_rules().items():
        if key.startswith("paths."):  # strings, some resolved by Hydra only inside a run (paths.output_dir)
            continue
        value = OmegaConf.select(cfg, key, default=missing)
        if value is not missing:
            _check(key, value, d.rule)
    for group, component in (components or {}).items():
        for key, d in declarations(type(component)).items():
            _check(f"{group}.{key}", getattr(component, key), d.rule)
    det = cfg.get("detection")
    if det is not None and det.positions > det.num_negatives + 1:
        raise CorexpError(f"detection.positions={det.positions} is not allowed: use 1..{det.num_negatives + 1} "
                          f"(detection.num_negatives + 1 slots)")


def _check(key: str, value: Any, rule: Rule) -> None:
    msg = problem(key, value, rule)
    if msg:
        raise CorexpError(msg)


def settings_tables() -> str:
    """The README's settings table: every setting with its allowed values, default and description; a component
    group's setting lists the options that take it, with each option's default."""
    from corexp.settings import Declaration as D

    rows = []
    for group in GROUPS:
        by_key: dict[str, list[tuple[str, Declaration]]] = {}
        for name, decls in group_settings(group).items():
            for key, d in decls.items():
                by_key.setdefault(key, []).append((name, d))
        for key, found in by_key.items():
            defaults = sorted({repr(d.default) if isinstance(d.default, str) else str(d.default) for _, d in found})
            default = found[0][1].default if len(defaults) == 1 else \
                ", ".join(f"{n}: {d.default}" for n, d in found)
            opts = "" if len(found) == len(options(group)) else f" ({group}={'/'.join(n for n, _ in found)})"
            rows.append((f"{group}.{key}", D(key, found[0][1].rule, default, found[0][1].doc + opts)))
    rows += [(key, d) for key, d in schema_rules().items()]
    return markdown_table(rows)


README_MARKERS = ("<!-- settings:start (generated: python -m corexp.validation --readme) -->", "<!-- settings:end -->")


def main(argv: list[str] | None = None) -> int:
    """Print the settings tables, or (--readme) rewrite them in the README between its markers."""
    import argparse
    from pathlib import Path

    from corexp.config import project_root

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
