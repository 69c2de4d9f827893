"""Errors that stop a run with one line saying what happened and what to do next (the command
line prints them without a traceback)."""


class RunStopped(RuntimeError):
    """A run fault with its guidance in the message."""


class RunFolderBusy(RunStopped):
    """Another live run holds the run folder."""


class NonFiniteError(RunStopped):
    """A step produced a non-finite loss or gradient norm."""
