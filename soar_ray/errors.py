"""Errors that stop a run with one line saying what happened and what to do next (the command
line prints them without a traceback)."""


class RunStopped(RuntimeError):
    """A run fault with its guidance in the message."""


class RunFolderBusy(RunStopped):
    """Another live run holds the run folder."""


class NonFiniteError(RunStopped):
    """A step produced a non-finite loss or gradient norm (`optimizer.on_nonfinite: stop`), or
    too many optimizer steps in a row were skipped for one (`skip_step`)."""


class UnsafeCheckpointError(RunStopped):
    """A checkpoint file holds objects that loading with weights_only=True refuses."""


class LearnerFailed(RunStopped):
    """A learner died or stopped answering; the group cannot go on without it."""


class WorkerRestarted(RuntimeError):
    """A rollout worker that Ray restarted was given work before the driver restored its stage
    and weights (it would have answered with the pretrained model)."""


class WeightGroupBroken(RunStopped):
    """A collective of the weight group (learner rank 0 and the rollout workers) failed: a member
    was lost part-way through a push, or the group could not form."""
