"""User-facing errors.

Anything a user can cause (bad input, bad config, a missing file) raises `UserError`. The CLI
prints its message as one line and exits non-zero; everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """An error the user can fix; its message is printed as one line without a traceback."""
