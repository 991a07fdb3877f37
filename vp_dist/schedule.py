"""When to prune and to what cumulative sparsity (SPEC 2): gradual and linear.

Prunings happen after optimizer steps `start, start + interval, ...`; the j-th (from 0) raises the
cumulative target to `min(target, (j + 1) * increment)`. The last one reaches `target` exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import VPConfig

# Absorbs float noise such as 0.5 / 0.1 = 5.000000000000001 in the count of prunings.
_EPS = 1e-9


@dataclass(frozen=True)
class PruningSchedule:
    start: int
    interval: int
    increment: float
    target: float

    @classmethod
    def from_config(cls, config: VPConfig) -> "PruningSchedule":
        return cls(config.start, config.interval, config.increment, config.target)

    @property
    def num_prunings(self) -> int:
        return max(1, math.ceil(self.target / self.increment - _EPS))

    @property
    def final_step(self) -> int:
        return self.start + (self.num_prunings - 1) * self.interval

    def sparsity_at(self, step: int) -> float | None:
        """Cumulative sparsity to reach after optimizer step `step`, or None if it is no pruning step."""
        if step < self.start or (step - self.start) % self.interval:
            return None
        index = (step - self.start) // self.interval
        if index >= self.num_prunings:
            return None
        if index == self.num_prunings - 1:
            return self.target
        return round((index + 1) * self.increment, 12)

    def pruning_steps(self) -> list[tuple[int, float]]:
        return [(self.start + j * self.interval, self.sparsity_at(self.start + j * self.interval))
                for j in range(self.num_prunings)]

    def is_finished(self, steps_done: int) -> bool:
        return steps_done >= self.final_step
