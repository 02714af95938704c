"""Counting skipped steps without stalling the loop.

The train step (step.py) skips an update whose loss or gradient norm is not finite and
reports `skipped`. Reading that flag right after dispatching a step would make the host
wait for the device every step, so each flag is read one step late, while the next step
already runs. After `limit` skips in a row the run stops (`NumericalFault`): the params
were never touched by the bad steps, so the last checkpoint is as good as the state.
"""

from __future__ import annotations

import jax

from jaxsft.train.faults import NumericalFault


class SkipGuard:
    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0
        self.counted_step = 0
        self.pending: tuple[int, jax.Array] | None = None

    def observe(self, step: int, skipped: jax.Array) -> None:
        """Records step `step`'s flag and counts the previous step's."""
        previous, self.pending = self.pending, (step, skipped)
        if previous is not None:
            self._count(*previous)

    def flush(self) -> None:
        """Counts the pending flag now (where the host waits for the device anyway)."""
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._count(*previous)

    def _count(self, step: int, skipped: jax.Array) -> None:
        self.counted_step = step
        if float(skipped) == 0.0:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.total += 1

    def check(self) -> None:
        if self.consecutive >= self.limit:
            raise NumericalFault(
                f"stopped at step {self.counted_step}: {self.consecutive} steps in a row had a non-finite loss or "
                f"gradient (train.max_skipped_steps={self.limit}); their updates were skipped and the checkpoints "
                f"hold the last finite state. Lower optim.learning_rate or check the data, then run the same command"
            )
