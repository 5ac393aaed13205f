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


MEMO_FIELDS = ("path", "size", "mtime_ns", "inode", "ctime_ns")
_SHA256: dict[tuple[Any, ...], str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _memo_key(path: Path) -> tuple[Any, ...]:
    st = Path(path).stat()
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def remember_sha256(path: Path, digest: str, memo_dir: Path | None = None) -> None:
    """Record a digest just computed from the file's bytes (a conversion hashes what it writes), so that the next
    content_sha256 of the unchanged file reads it instead of hashing the file again."""
    memo = _memo_key(path)
    _SHA256[memo] = digest
    if memo_dir is not None:
        with contextlib.suppress(OSError, CorexpError):
            atomic_write_json(_memo_path(memo, memo_dir), {**dict(zip(MEMO_FIELDS, memo)), "sha256": digest})


def content_sha256(path: Path, memo_dir: Path | None = None, hash_file: Callable[[Path], str] = sha256_file) -> str:
    """sha256 of a file's bytes, memoised per process and, with memo_dir, across processes (<memo_dir>/digests) by path,
    size, mtime, inode and ctime. Any write changes the ctime, which no user can set back (`touch -r`, `rsync -t` and
    equal-size edits restore the mtime only), and a replaced file has another inode: any change is hashed again."""
    memo = _memo_key(path)
    if memo not in _SHA256:
        stored = _stored_sha256(memo, memo_dir)
        if stored is None:  # a read-only cache only costs a re-read next time
            remember_sha256(path, hash_file(Path(path)), memo_dir)
        else:
            _SHA256[memo] = stored
    return _SHA256[memo]


def _memo_path(memo: tuple[Any, ...], memo_dir: Path) -> Path:
    return Path(memo_dir) / "digests" / (hashlib.sha256(memo[0].encode()).hexdigest()[:24] + ".json")


def _stored_sha256(memo: tuple[Any, ...], memo_dir: Path | None) -> str | None:
    if memo_dir is None:
        return None
    try:
        stored = json.loads(_memo_path(memo, memo_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or [stored.get(k) for k in MEMO_FIELDS] != list(memo):
        return None
    return stored.get("sha256")
