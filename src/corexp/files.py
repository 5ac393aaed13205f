"""Crash-safe cache files: written to a temp file in the same folder, then renamed into place."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from corexp.errors import CorexpError


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True):
            pass
    except OSError as err:
        raise CorexpError(f"cache folder {path} is not writable ({err.strerror}); set paths.cache_dir or COREXP_CACHE") from None
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive POSIX lock on `path` (fcntl.lockf, which also works on NFS) while the body runs.

    Jobs that need the same cache entry at once (a sweep's parallel workers, SLURM jobs on nodes sharing the cache
    folder) serialise on it: the first computes and writes atomically, the others wait and then read its file.
    """
    ensure_writable_dir(Path(path).parent)
    with open(path, "a+") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)


def cached(path: Path, compute: Callable[[], None]) -> Path:
    """`path` if it exists, else compute() under the entry's lock (compute writes `path` atomically)."""
    path = Path(path)
    if path.exists():
        return path
    with file_lock(path.parent / f".{path.name}.lock"):
        if not path.exists():  # another process may have written it while this one waited
            compute()
    return path


def stable_key(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts: cache keys that change when any input changes."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
