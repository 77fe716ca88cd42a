"""How a failure is reported: which errors are the user's (``cdlm: error: ...``, exit status 2) and which are a run
that failed (exit status 1); shared by the command line and the sweep, which reports each failed point so."""

from __future__ import annotations

from cdlm.nonfinite import NonFiniteLoss

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""Errors in what the user asked for (ConfigError, CheckpointError, RunDirError, data errors are ValueErrors):
``cdlm: error: ...`` and exit status 2."""

OPTIONAL_DEPENDENCY = "this needs an optional dependency (pip install 'cdlm[hf,plot]')"


class RunFailure(RuntimeError):
    """A run that failed while running (a sweep point, say), after its own error was reported: exit status 1."""


def exit_status(err: BaseException) -> int | None:
    """The command line's exit status for ``err``: 2 for a user error or a missing optional package, 1 for a run
    that failed (a diverged loss, a failed sweep point), None for anything else (a bug: it keeps its traceback)."""
    if isinstance(err, USER_ERRORS) or isinstance(err, ModuleNotFoundError):
        return 2
    if isinstance(err, (NonFiniteLoss, RunFailure)):
        return 1
    return None


def error_message(err: BaseException) -> str:
    """What ``cdlm: error:`` says about ``err`` (a missing package with the ``pip install`` line)."""
    if isinstance(err, ModuleNotFoundError) and not isinstance(err, USER_ERRORS):
        return f"{err}; {OPTIONAL_DEPENDENCY}"
    return str(err)
