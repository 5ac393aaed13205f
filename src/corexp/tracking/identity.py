"""What a run computes and with which code: its components' keys (`RunKey`) and a digest of the compute path's code
and of the libraries that change its numbers.

The compute path is the packages that turn a config into numbers: corexp.data, corexp.engine, corexp.components and
corexp.pipeline (the head atlas's computation included, pipeline/atlas.py), without pipeline/record.py and
pipeline/atlas_record.py, which only log numbers computed elsewhere (pipeline/results.py, pipeline/atlas.py). Each
module enters as its syntax tree without docstrings, so rewording a docstring or a comment, or reformatting, reruns
nothing, while any change of code does; the report, the studies, tracking and the CLI are outside it (editing them
never marks a FINISHED run as older code).

A run's settings are the keys of the components it computes with (settings.Component.key, ir_measures style:
`CoRe(tau=0.1)`, `Window(width=4)`, `Dense(encoder=Encoder(...))`, defaults and data locations left out) and its seed;
its identity, its MLflow params and (corexp.tracking.names) its name and report label all derive from them, and the
report reads them back from the params (`RunKey.from_params`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corexp.files import stable_key
from corexp.locations import PACKAGE_DIR
from corexp.settings import Component, declarations, parse_key, plain

COMPUTE_PATH = ("data", "engine", "components", "pipeline")
# Inside the compute path but computing no number: how a finished job's numbers are logged (tags, artifact names).
LOGGING_ONLY = ("pipeline/record.py", "pipeline/atlas_record.py")
# Libraries whose version changes the numbers a job computes (attention arithmetic, tokenization, retrieval, measures).
NUMERIC_LIBRARIES = ("torch", "transformers", "tokenizers", "sentence-transformers", "bm25s", "PyStemmer", "ir_measures")


def normalized_source(path: Path) -> bytes:
    """The module's syntax tree without docstrings (comments and layout never reach the tree)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False).encode()


def compute_files(package: Path = PACKAGE_DIR) -> list[Path]:
    return sorted(p for part in COMPUTE_PATH for p in (package / part).rglob("*.py")
                  if p.relative_to(package).as_posix() not in LOGGING_ONLY)


@functools.cache
def code_digest(package: Path = PACKAGE_DIR) -> str:
    """sha256 over the compute path's normalized modules and the versions of NUMERIC_LIBRARIES (16 hex digits)."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for path in compute_files(package):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + normalized_source(path) + b"\0")
    for name in NUMERIC_LIBRARIES:
        try:
            h.update(f"{name}=={version(name)}\0".encode())
        except PackageNotFoundError:
            h.update(f"{name}: absent\0".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """What a run computes and with which code.

    config_hash: the job's settings with each data set as its content fingerprint (no paths: another clone or node
    finds the same runs); code_digest: the compute path's code; setup_hash: the settings without the data's content
    (tells "the data changed" from "another config"); data_fingerprint: the data's content.
    """

    config_hash: str
    code_digest: str
    setup_hash: str = ""
    data_fingerprint: str = ""


# The groups whose components compute a run's numbers, in the order keys are listed (tracking only logs them).
COMPUTING = ("model", "data", "prompt", "heads", "first_stage", "truncation", "fusion", "scoring", "detection")
KEY_PARAM = "key."  # MLflow param of each component's key: key.heads = CoRe(tau=0.1)


@dataclass(frozen=True)
class RunKey:
    """A run as the keys of the components it computes with, as the job resolved them at the door (the model's τ and
    precision, the prompt as its data set reads it, the truncation its head selector makes of it; detection only for
    selectors that detect), and its seed."""

    keys: tuple[tuple[str, str], ...]
    seed: int = 0

    @classmethod
    def of(cls, components: Mapping[str, Component], seed: int) -> RunKey:
        return cls(tuple((group, components[group].key()) for group in COMPUTING if group in components), seed)

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> RunKey | None:
        """The run key a run logged (None: logged before keys were; `python -m corexp.migrate` adds them)."""
        keys = {g: params[KEY_PARAM + g] for g in COMPUTING if KEY_PARAM + g in params}
        if not keys:
            return None
        resolved = params.get("model.dtype_resolved")  # keys of 2026-12-05, before the door resolved the precision
        if resolved and "model" in keys and "dtype=" not in keys["model"]:
            _register_components()
            keys["model"] = dataclasses.replace(parse_key(keys["model"]), dtype=resolved).key()
        return cls(tuple(keys.items()), int(params.get("seed", 0)))

    @functools.cached_property
    def _parsed(self) -> dict[str, Component]:
        _register_components()
        return {group: parse_key(key) for group, key in self.keys}

    def components(self) -> dict[str, Component]:
        """Each group's component, parsed back from its key (once per run key)."""
        return dict(self._parsed)

    def __getitem__(self, group: str) -> Component:
        return self._parsed[group]

    def identity(self, content: Mapping[str, str], code: str) -> Identity:
        """The keys and seed (setup), with each data set as its content fingerprint (never a path), and the code."""
        return self.identity_of(stable_key(dict(content)), code)

    def identity_of(self, fingerprint: str, code: str) -> Identity:
        """The identity with the data's content fingerprint (a run's `data_fingerprint` tag)."""
        setup = stable_key({"keys": dict(self.keys), "seed": self.seed})
        return Identity(stable_key(setup, fingerprint), code, setup, fingerprint)

    def params(self) -> dict[str, str]:
        """MLflow params: each component's settings, flattened (`heads.k`), and its key (`key.heads`). Where data is
        read from is not in a key, so not here: the job logs it (`location_params`)."""
        located = {f"{group}.{name}" for group, c in self._parsed.items() for name in _locations(c)}
        tree = {"seed": self.seed, **{group: plain(c) for group, c in self._parsed.items()}}
        return {**{k: v for k, v in flatten(tree).items() if k not in located},
                **{KEY_PARAM + group: key for group, key in self.keys}}


def location_params(components: Mapping[str, Component]) -> dict[str, str]:
    """Where the components read their data from, as MLflow params (`data.local_dir`): the location settings set."""
    return {f"{group}.{name}": str(getattr(c, name)) for group, c in components.items() for name in _locations(c)
            if getattr(c, name) is not None}


def _locations(component: Component) -> list[str]:
    return [name for name, d in declarations(type(component)).items() if d.location]


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in (tree.items() if isinstance(tree, dict) else []):
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


def _register_components() -> None:
    """Import every component module, so that each key name is known to settings.parse_key."""
    import corexp.components.detection
    import corexp.components.first_stage
    import corexp.components.fusion
    import corexp.components.heads
    import corexp.components.truncation
    import corexp.data.datasets
    import corexp.engine.models
    import corexp.engine.prompt
    import corexp.engine.scoring  # noqa: F401


def git_commit() -> str:
    """The checkout's commit (provenance only: the code digest is what identifies the code)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("corexp", "torch", "transformers", "ir_datasets", "ir_measures", "bm25s", "mlflow", "hydra-core"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def provenance_tags() -> dict[str, str]:
    return {"git_commit": git_commit(), **{f"version.{k}": v for k, v in package_versions().items()}}
