"""The one exception type that reaches the user as a single line (no traceback)."""


class UserError(Exception):
    """Bad input or an unusable environment. The message names the problem and how to fix it."""
