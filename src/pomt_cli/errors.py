"""The one exception type that reaches the user as a one-line message with exit code 2."""


class PomtError(Exception):
    """A problem with the user's input or environment.

    The message is one line that says what is wrong and what to do; the CLI prints it
    without a traceback and exits with code 2. Library code raises it for bad input that
    a user (not a programmer) can cause: a missing file, an infeasible budget, a grid that
    does not fit the model.
    """


class PruningError(PomtError, ValueError):
    """A model or setting that :func:`pomt_cli.pruning.apply` refuses, before it changes the model.

    Also a ``ValueError``, as these errors were before this class existed.
    """
