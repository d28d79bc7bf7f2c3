"""The one error type every command turns into a one-line message with exit code 2, and the
one-line warning for what a run repairs by itself (a damaged cache entry, a dropped class)."""

import sys


class UsageError(Exception):
    """Bad configuration or input that the user must fix: reported in one line, exit code 2."""


def warn(msg: str) -> None:
    """One line on stderr, `warning: ...`: the run goes on."""
    print(f"warning: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
