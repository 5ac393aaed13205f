"""One exception type for bad input: the CLI prints its message as a single line, never a traceback."""

from __future__ import annotations

from collections.abc import Callable


class CorexpError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


STORAGE = (  # (what the OS / SQLite says, what it means for the user)
    (("database or disk is full", "no space left on device", "disk quota exceeded"), "the disk is full"),
    (("readonly database", "read-only file system"), "it is read-only"),
    (("permission denied",), "it is not writable (permission denied)"),
)
_ERRNO = {28: "the disk is full", 122: "the disk is full", 30: "it is read-only", 13: "it is not writable (permission denied)"}


def storage_problem(err: BaseException) -> tuple[str, str] | None:
    """(what is wrong, the file it names or "") when an error, or one behind it (SQLAlchemy and MLflow wrap SQLite's),
    is the OS or SQLite refusing a write: a full disk, a read-only folder, a missing permission."""
    seen = 0
    while err is not None and seen < 12:
        if isinstance(err, OSError) and err.errno in _ERRNO:
            return _ERRNO[err.errno], str(err.filename or "")
        text = str(err).lower()
        for needles, meaning in STORAGE:
            if any(n in text for n in needles):
                return meaning, ""
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def one_line(err: BaseException) -> str:
    """What the CLI prints for a failure: a CorexpError's own message; a full disk or a read-only or unwritable file
    by name; Ctrl-C as an interruption; anything else as an internal error to report, with its type and first line
    (debug=true shows the traceback)."""
    if isinstance(err, CorexpError):
        return " ".join(str(err).split("\n"))
    if type(err).__name__ == "Terminated":
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if "file is not a database" in str(err) or "database disk image is malformed" in str(err):
        return "the MLflow store is not an SQLite database (another file, or a damaged store): check the tracking URI"
    problem = storage_problem(err)
    if problem is None and isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err}; check the path"
    if problem is not None:
        meaning, path = problem
        where = f"{path}: " if path else "a file corexp writes (the MLflow store, the cache or the output folder): "
        return f"cannot write {where}{meaning}; free space or make it writable, or point tracking.uri / paths.cache_dir elsewhere"
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return (f"internal error ({type(err).__name__}: {first}); rerun with debug=true for the traceback and please report it "
            "with the command you ran")


def cli_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command-line tool's body with the job CLI's error handling: one line `<prog>: error: ...` and exit 2 for a
    CorexpError, 1 for anything else (one_line names full disks, unreadable stores and paths); COREXP_DEBUG=1 keeps the
    traceback."""
    import os
    import sys

    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("COREXP_DEBUG"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, CorexpError) else 1
