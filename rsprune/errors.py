"""The one error type every command turns into a one-line message with exit code 2."""


class UsageError(Exception):
    """Bad configuration or input that the user must fix: reported in one line, exit code 2."""
