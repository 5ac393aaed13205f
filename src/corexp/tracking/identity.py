"""Which code computed a run: a digest of the compute path's code and of the libraries that change its numbers.

The compute path is the packages that turn a config into numbers: corexp.data, corexp.engine, corexp.components and
corexp.pipeline (the head atlas's computation included, pipeline/atlas.py), without pipeline/record.py and
pipeline/atlas_record.py, which only log numbers computed elsewhere (pipeline/results.py, pipeline/atlas.py). Each
module enters as its syntax tree without docstrings, so rewording a docstring or a comment, or reformatting, reruns
nothing, while any change of code does; the report, the studies, tracking and the CLI are outside it (editing them
never marks a FINISHED run as older code).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from corexp.locations import PACKAGE_DIR

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
