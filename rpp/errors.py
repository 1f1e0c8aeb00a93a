"""Errors that are the user's mistake: the CLIs print them as one line and exit non-zero, without a traceback."""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A user mistake (missing file, bad option value, unreadable config): reported as one line, no traceback."""
