"""The one error type a user sees: a single line that names the problem and the fix."""


class UserError(Exception):
    """Bad input (config, data, checkpoint). The CLI prints `error: <message>` and exits 2, no traceback."""
