"""The base of every error a user can fix: a config key, a file, a row, a model directory."""


class SwitchkdError(Exception):
    """An error the user can fix; its message is one line naming what to fix, so the command line
    prints it without a traceback."""
