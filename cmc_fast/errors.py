"""User-facing errors: the CLI turns these into a one-line message and exit code 2, no traceback."""


class UsageError(ValueError):
    """A user mistake (unknown name, missing path, bad value): the message names the argument and the fix."""


class CollectiveFailure(RuntimeError):
    """A data-parallel run lost a process (a collective failed or timed out); the message says what to do."""
