"""Where things are: the package, its resources, the conf/ tree and the project root (no corexp imports)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RESOURCES_DIR = PACKAGE_DIR / "resources"


def config_dir() -> Path:
    """conf/ of a source checkout (editable install), else the copy shipped inside the package."""
    for candidate in (PACKAGE_DIR.parents[1] / "conf", PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("corexp config tree not found (expected conf/config.yaml)")


def project_root() -> Path:
    """The folder holding conf/: run folders and the MLflow store live here, whatever the working directory."""
    env = os.environ.get("COREXP_ROOT")
    return Path(env).resolve() if env else config_dir().parent
