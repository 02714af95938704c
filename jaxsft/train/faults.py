"""Ways a run stops on purpose, each with one line for the user and a documented exit code.

`jaxsft` prints `jaxsft: <message>` and exits with `exit_code` (docs/reliability.md). The
module imports nothing heavy: the CLI catches these without loading JAX.

    2    a bad config or bad data (ConfigError, DataError; not defined here)
    3    NumericalFault: train.max_skipped_steps consecutive non-finite steps
    4    RunDirLocked: another `jaxsft train` holds the run directory
    5    CheckpointDamaged: a damaged checkpoint with checkpoint.on_corrupt=fail
    6    CheckpointWriteFailed: a checkpoint could not be written (disk full, read-only)
    130  Preempted by SIGINT, 143 by SIGTERM: the current step was saved
"""

from __future__ import annotations

import signal


class RunStopped(Exception):
    """The run stopped for a reason the user can act on; the message is one line."""

    exit_code = 1


class NumericalFault(RunStopped):
    exit_code = 3


class RunDirLocked(RunStopped):
    exit_code = 4


class CheckpointDamaged(RunStopped):
    exit_code = 5


class CheckpointWriteFailed(RunStopped):
    exit_code = 6


class Preempted(RunStopped):
    """SIGTERM / SIGINT: the step in flight finished and was saved; exit 128 + the signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
