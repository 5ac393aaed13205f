"""One exception type for bad input: the CLI prints its message as a single line, never a traceback."""

from __future__ import annotations


class CorexpError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


def one_line(err: BaseException) -> str:
    """What the CLI prints for a failure: a CorexpError's own message; anything else as an internal error to report,
    with its type and first line (debug=true shows the traceback)."""
    if isinstance(err, CorexpError):
        return " ".join(str(err).split("\n"))
    if type(err).__name__ == "Terminated":
        return str(err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return (f"internal error ({type(err).__name__}: {first}); rerun with debug=true for the traceback and please report it "
            "with the command you ran")
