"""The one exception type the CLI turns into a single-line message (no traceback)."""


class UserError(Exception):
    """A problem the user can fix: bad input, a bad config value, a missing file.

    The message names the thing and the fix in one line; the CLI prints it and exits non-zero.
    """


class ConfigError(UserError, ValueError):
    """An invalid configuration: unknown key, wrong type or out-of-range value."""
