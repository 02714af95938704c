"""SIGTERM / SIGINT during training: finish the step in flight, save it, stop.

TPU preemption and SLURM send SIGTERM (then SIGKILL after a grace period); Ctrl-C sends
SIGINT. Inside `StopSignals` neither kills the process: the handler only records the
signal, and the loop asks `requested(step)` after each step, saves that step and raises
`Preempted` (exit code 128 + the signal: 143, 130).

With several processes every host must save the same step, so the signal is not handled
here: JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM and
`reached_preemption(step)` agrees on a step across hosts (Orbax's sync point).
"""

from __future__ import annotations

import signal

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self, reached_preemption=lambda step: False):
        self.reached_preemption = reached_preemption  # the multi-host sync point
        self.signum: int | None = None
        self.previous: dict = {}

    def _record(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, the latest checkpoint is kept
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if jax.process_count() == 1:
            self.previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, step: int) -> int | None:
        """The signal that asks the run to stop after `step`, if any."""
        if self.signum is None and jax.process_count() > 1 and self.reached_preemption(step):
            self.signum = signal.SIGTERM
        return self.signum
