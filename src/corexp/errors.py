"""One exception type for bad input: the CLI prints its message as a single line, never a traceback."""


class CorexpError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""
