"""Components: each option of the groups heads, first_stage, truncation and fusion is one class, built by
`hydra.utils.instantiate` from the `_target_` of its YAML file, whose other keys are exactly the class's settings.

A new head metric or first stage is one class (a frozen dataclass whose fields are declared with
`corexp.settings.setting`) and one YAML file: the option list, the settings table, validation, labels, logged params
and the run identity all come from the class. A setting given for a group whose chosen option does not take it (for
instance `heads.k` in a sweep over `heads=all,core`) is passed to the options that take it and reported as ignored by
the others; `normalize_overrides` makes that possible on the command line and in `compose_config`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from corexp.errors import CorexpError
from corexp.settings import Declaration, declarations

GROUPS = ("heads", "first_stage", "truncation", "fusion")


class Component:
    """Base of every component: its settings are its dataclass fields; `name` is its option (the YAML file's stem)."""

    name: ClassVar[str] = ""

    def settings(self) -> dict[str, Any]:
        """The values of its own settings (what it computes with): logged as params, part of the run identity."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def label(self, hide: frozenset[str] = frozenset()) -> str | None:
        """How run names and report rows show it (None: nothing to show); `hide` leaves out those settings' values."""
        return None


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


@functools.cache
def options(group: str) -> dict[str, type]:
    """Option name -> class, read from conf/<group>/*.yaml (`_target_`)."""
    import hydra.utils

    from corexp.locations import config_dir

    out = {}
    for path in sorted(Path(config_dir(), group).glob("[!_]*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target:
            out[path.stem] = hydra.utils.get_class(target)
    return out


@functools.cache
def group_settings(group: str) -> dict[str, dict[str, Declaration]]:
    """Option name -> its declared settings."""
    return {name: declarations(cls) for name, cls in options(group).items()}


def setting_names(group: str) -> set[str]:
    return {key for decls in group_settings(group).values() for key in decls}


@dataclass(frozen=True)
class Built:
    """A component and the settings given for its group that it does not take (reported, never used)."""

    component: Any
    ignored: dict[str, Any]


def build(node: Any, group: str) -> Built:
    """Instantiate one group's option with hydra.utils.instantiate, leaving out keys its class does not declare."""
    import hydra.utils

    if node is None or "_target_" not in node:
        raise CorexpError(f"{group} has no _target_: choose one of {', '.join(options(group))} ({group}=<option>)")
    cls = hydra.utils.get_class(node["_target_"])
    own = {f.name for f in dataclasses.fields(cls)}
    ignored = {k: _plain(v) for k, v in node.items() if k != "_target_" and k not in own}
    kept = OmegaConf.create({k: v for k, v in node.items() if k == "_target_" or k in own})
    return Built(hydra.utils.instantiate(kept), ignored)


def normalize_overrides(args: list[str]) -> list[str]:
    """Make `<group>.<setting>=v` of a component group an add-or-override (`++`) when some option of the group declares
    the setting: a sweep over options that differ in their settings composes, and options that do not take the value
    report it as ignored. Keys that no option declares are left for the pre-check to reject."""
    out = []
    for arg in args:
        key, eq, _ = arg.partition("=")
        bare = key.lstrip("+~")
        group, dot, field = bare.partition(".")
        if eq and dot and not key.startswith(("~", "++")) and group in GROUPS and "." not in field \
                and field in setting_names(group):
            arg = "++" + bare + arg[len(key):]
        out.append(arg)
    return out
