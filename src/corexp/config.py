"""The door's config plumbing: where conf/ lives, composing it, OmegaConf resolvers, the classes the groups build and
building them (`build`: hydra.utils.instantiate from `_target_`, nested strategies included).

Every config group is a component class (corexp.settings.Component) named by the `_target_` of its YAML: the groups
with options (heads, first_stage, truncation, fusion, and the prompt's nested strategies) have one class per option;
the others have one class each (GROUP_CLASSES). The top-level keys are `RunOptions`, `paths` is `Paths`. Defaults live
in those classes; YAML files hold only what differs from them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from corexp.components.dense import EncoderSpec
from corexp.components.detection import Detection
from corexp.data.datasets import DataSource
from corexp.engine.models import ModelSpec, resolved_dtype
from corexp.engine.prompt import PromptSpec
from corexp.engine.scoring import Scoring
from corexp.errors import CorexpError
from corexp.locations import PACKAGE_DIR, RESOURCES_DIR, config_dir, project_root  # noqa: F401 - re-exported
from corexp.settings import Component, Declaration, declarations, plain, problem, setting
from corexp.tracking.tracker import TrackingSpec


def compose_config(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> Any:
    """The job config as the CLI would compose it (without running it), for the Python API, scripts and tests."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)), return_hydra_config=return_hydra_config)


def data_folder(data_dir: str | None, name: str) -> str | None:
    """<paths.data_dir>/<dataset name> when that BEIR-layout folder exists, so one root serves every dataset of a sweep."""
    if not data_dir:
        return None
    folder = Path(data_dir).expanduser().resolve() / name
    return str(folder) if folder.is_dir() else None


def resource_query_ids(name: str, split: str = "test") -> list[str]:
    """The judged query ids of a packaged sample's split (e.g. the 50 SciFact test queries), sorted."""
    lines = (RESOURCES_DIR / name / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
    return sorted({line.split("\t")[0] for line in lines if line.strip()}, key=lambda q: (len(q), q))


def _register_resolvers() -> None:
    resolvers = {
        "corexp_root": lambda: str(project_root()),
        "corexp_resource": lambda name: str(RESOURCES_DIR / name),
        "corexp_data_folder": data_folder,
        "corexp_resource_query_ids": resource_query_ids,
        "corexp_pid": lambda: str(os.getpid()),  # run and sweep folders unique per process (conf/config.yaml)
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


@dataclass(frozen=True)
class RunOptions:
    """The job's top-level settings (conf/config.yaml): how it runs, not what it computes (except `seed`)."""

    seed: int = setting(0, ge=0, doc="seed of Python, NumPy and torch for the job")
    debug: bool = setting(False, doc="show full tracebacks instead of one-line errors")
    progress: bool = setting(True, doc="progress bars")
    force: bool = setting(False, doc="rerun even if a FINISHED run of the same identity (config and code) is in the store")
    dry_run: bool = setting(False, doc="print what the job would do and stop, without loading a model")
    readout_cache: bool = setting(False, doc="keep every head's token scores per prompt (cache_dir/readout): other head sets "
                                             "of the same model, prompt and candidates cost no forward")


@dataclass(frozen=True)
class Paths:
    """Where a job reads and writes (conf/paths/default.yaml derives them from one root)."""

    root_dir: str = setting(doc="project root: run folders (outputs/, multirun/) and the default MLflow store")
    cache_dir: str = setting(doc="models, first-stage runs, detection and read-out tables (COREXP_CACHE)")
    output_dir: str | None = setting(None, null="outside a Hydra run: none", doc="this job's folder (Hydra's run or sweep folder)")
    data_dir: str | None = setting(None, null="none", doc="root of BEIR-layout folders named like the data configs (COREXP_DATA_DIR)")

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir)


# Groups whose options are different classes (conf/<group>/*.yaml each name a `_target_`).
GROUPS = ("heads", "first_stage", "truncation", "fusion")
# Strategy groups nested in a component (conf/<parent>/<field>/*.yaml): `<parent>.<field>=<option>` on the command
# line chooses an option (Hydra's `<parent>/<field>=<option>`).
NESTED = ("prompt/span_rule", "prompt/doc_order", "prompt/doc_field", "prompt/words", "first_stage/encoder")


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
    """Instantiate one group's node (nested `_target_`s included) with hydra.utils.instantiate. A key the class does
    not declare is ignored when another option of the group declares it, and an error otherwise."""
    import hydra.utils

    if node is None or "_target_" not in node:
        choices = ", ".join(options(group)) if group in GROUPS else "its option"
        raise CorexpError(f"{group} has no _target_: choose one of {choices} ({group}=<option>)")
    try:
        cls = hydra.utils.get_class(node["_target_"])
    except Exception:
        raise CorexpError(f"{group}._target_={node['_target_']} is not a corexp class; fix conf/{group}/") from None
    own = {f.name for f in dataclasses.fields(cls)}
    others = setting_names(group) if group in GROUPS else set()
    unknown = sorted(k for k in node if k != "_target_" and k not in own and k not in others)
    if unknown:
        raise CorexpError(f"{group}.{unknown[0]} is not a setting of {group} ({', '.join(sorted(own)) or 'none'})")
    ignored = {k: plain(_container(v)) for k, v in node.items() if k != "_target_" and k not in own}
    kept = OmegaConf.create({k: v for k, v in node.items() if k == "_target_" or k in own})
    try:
        component = hydra.utils.instantiate(kept, _convert_="all")
    except Exception as err:  # a nested option's unknown key or a wrong type: Hydra's multi-line report, in one line
        cause = err.__cause__ or err
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise CorexpError(f"{group}: cannot build {cls.__name__} ({first}); check the {group} settings") from None
    component.check()
    return Built(component, ignored)


def _container(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


# The groups that build one class whatever the option (the option files differ in values only).
GROUP_CLASSES: dict[str, type] = {"model": ModelSpec, "data": DataSource, "detection": Detection, "prompt": PromptSpec,
                                  "tracking": TrackingSpec, "scoring": Scoring, "first_stage/encoder": EncoderSpec}
TOP_LEVEL: dict[str, type] = {"paths": Paths}


def _dotted(group: str) -> str:
    return group.replace("/", ".")


@functools.cache
def declared() -> dict[str, list[tuple[str, Declaration]]]:
    """dotted key -> [(where it is declared: the group's class or an option, declaration)], for every setting."""
    out: dict[str, list[tuple[str, Declaration]]] = {}

    def add(prefix: str, owner: str, cls: type) -> None:
        for key, d in declarations(cls).items():
            out.setdefault(f"{prefix}{key}", []).append((owner, d))

    add("", "top level", RunOptions)
    for group, cls in {**TOP_LEVEL, **GROUP_CLASSES}.items():
        add(f"{_dotted(group)}.", group, cls)
    for group in (*GROUPS, *NESTED):
        for name, cls in options(group).items():
            add(f"{_dotted(group)}.", f"{group}={name}", cls)
    return out


def normalize_overrides(args: list[str]) -> list[str]:
    """Rewrite command-line overrides into what Hydra composes:

    - `<key>=v` of any declared setting becomes an add-or-override (`++<key>=v`): a setting's default lives in its
      class, so the YAML need not list it, and a sweep over options that differ in their settings composes (an option
      that does not take the value reports it as ignored);
    - `<parent>.<strategy>=<option>` (`prompt.doc_order=reversed`) chooses the nested group's option
      (`prompt/doc_order=reversed`).

    Keys that no class declares are left for corexp's check (corexp.validation) to reject."""
    keys = declared()
    nested = {_dotted(g): g for g in NESTED}
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+~")
        if eq and bare in nested and not key.startswith("~"):
            arg = f"{nested[bare]}={value}"
        elif eq and "." in bare and bare in keys and not key.startswith(("~", "++")):
            arg = "++" + bare + arg[len(key):]
        out.append(arg)
    return out

def logged_config(text: str) -> DictConfig:
    """A run's logged config.yaml (resolved), to rebuild its job at the door (corexp.migrate)."""
    return OmegaConf.create(text)


def components_of(cfg: DictConfig, resolved: bool = True) -> tuple[dict[str, Any], RunOptions, tuple[str, ...]]:
    """Every group built from its `_target_` and checked, then resolved (`resolve`; resolved=False: as configured, for
    the README's defaults); the top-level options; and the warnings for settings given to an option that does not
    take them."""
    groups = {group: build(cfg[group], group) for group in (*GROUPS, *[g for g in GROUP_CLASSES if "/" not in g])}
    components = {group: b.component for group, b in groups.items()}
    options = RunOptions(**{f: cfg[f] for f in RunOptions.__dataclass_fields__})
    validate({**components, "": options})
    ignored = tuple(f"{group}.{k}={v} is ignored by {group}={b.component.name}{getattr(b.component, 'ignored_hint', '')}"
                    for group, b in groups.items() for k, v in b.ignored.items())
    return (resolve(components) if resolved else components), options, ignored


def resolve(c: dict[str, Any]) -> dict[str, Any]:
    """Each component as this job computes with it, so that its key says so: the model's precision (auto: bf16 on
    CUDA, fp32 elsewhere), the prompt as its data set reads it (ICR's question instruction, text-only sets), a null
    heads.tau as the model's τ, and the truncation its head selector makes of it (auto with every head is none)."""
    model, data, heads = c["model"], c["data"], c["heads"]
    out = {**c, "model": dataclasses.replace(model, dtype=str(resolved_dtype(model)).replace("torch.", "")),
           "prompt": c["prompt"].for_dataset(data.name, data.question_style),
           "truncation": c["truncation"].effective(heads)}
    if getattr(heads, "tau", 0) is None:
        out["heads"] = dataclasses.replace(heads, tau=model.tau)
    return out


def validate(components: dict[str, Any]) -> None:
    """Check every built component's settings (nested strategies included) against their declarations; raise one
    CorexpError naming the setting, the value and what is allowed. The group "" holds the top-level RunOptions."""
    for group, component in components.items():
        _check_component(group.replace("/", "."), component)


def _check_component(prefix: str, component: Any) -> None:
    for key, d in declarations(type(component)).items():
        value = getattr(component, key)
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Component):
            _check_component(dotted, value)
            continue
        msg = problem(dotted, value, d.rule)
        if msg:
            raise CorexpError(msg)


def paths_of(cfg: DictConfig) -> Paths:
    from omegaconf.errors import InterpolationResolutionError

    try:
        output = cfg.paths.output_dir
    except InterpolationResolutionError:  # ${hydra:runtime.output_dir} outside a Hydra run (Python API, tests)
        output = None
    return Paths(root_dir=str(cfg.paths.root_dir), cache_dir=str(cfg.paths.cache_dir), output_dir=output,
                 data_dir=cfg.paths.get("data_dir"))


def config_text(cfg: DictConfig) -> str:
    """The resolved config as YAML (paths.output_dir left unresolved outside a Hydra run)."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    node = OmegaConf.create(tree)
    if paths_of(cfg).output_dir is None:
        node.paths.output_dir = None
    return OmegaConf.to_yaml(node, resolve=True)


_register_resolvers()

__all__ = ["GROUP_CLASSES", "RESOURCES_DIR", "Paths", "RunOptions", "compose_config", "config_dir", "project_root"]
