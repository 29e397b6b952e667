"""The base of every error a user can fix (a config key, a file, a row, a model directory), and the
exception a SIGTERM becomes."""


class SwitchkdError(Exception):
    """An error the user can fix; its message is one line naming what to fix, so the command line
    prints it without a traceback."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (``kill``, a job scheduler, ``ray job stop``) taken as Ctrl-C: a run stops and
    releases everything the same way; the command line exits 143 instead of 130."""
