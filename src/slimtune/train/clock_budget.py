"""train.budget_s: a run's length set by a training-time budget, measured by the run itself.

`compare` / `search --budget-minutes` give every row the same training time on a clock (cpu or wall,
search/prepare.resolve_clock). The row's steps were first the budget over a short timing run's step
time; that prediction missed by 10-25% (issue 28, third run: MiniLM timed 0.52 CPU s/step and ran at
0.64; SmolLM2's search pick timed 2.29 and ran at 2.57 while full fine-tuning timed 3.69 and ran at
3.23), so rows of one table trained 78 and 100 CPU seconds under a 90-second budget. Here the run
re-plans its own length from its steady steps as it goes:

    total_steps = floor(budget_s / steady step)     steady step = this session's steps after its
                                                    first (the warm-up), on the budget's clock

from its `MIN_STEADY`-th steady step on, at every step. The decay follows the new total, so a row
always ends its decay (the warm-up keeps the steps planned from the guess); the run's max_steps (the
timing run's prediction) is the length until then. A resumed run keeps the length its checkpoint had (saved with it) until its own
steady steps re-plan it. One process only: ranks would each measure their own step and disagree on
the length. AdaLoRA's own rank schedule (method.total_step) stays where compare / search set it from
the guess.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .config import JobConfigError

MIN_STEADY = 3  # steady steps before the first re-plan: one step's time is too noisy to set a length by


@dataclass
class ClockBudget:
    seconds: float  # training time of the run on `clock`
    clock: str  # "cpu" (resources.cpu_step_clock) or "wall"

    @classmethod
    def of(cls, seconds: Optional[float], clock: str, world: int, cuda: bool) -> Optional["ClockBudget"]:
        if seconds is None:
            return None
        if clock == "cpu" and cuda:
            raise JobConfigError("train.budget_clock: cpu on a GPU: the GPU's work is not on the CPU clock, so a step "
                                 "would look almost free; set train.budget_clock: wall")
        if world > 1:
            raise JobConfigError(f"train.budget_s with {world} processes: each rank would time its own steps and "
                                 "they would disagree on the run's length; give train.max_steps instead, or run one "
                                 "process")
        return cls(seconds, clock)

    def total(self, current: int, done: int, session_steps: int, session_s: float, first_step_s: float) -> int:
        """The run's steps: `current` (the length so far) until this session has MIN_STEADY steady
        steps, then the budget over their mean, never below `done` (a run whose budget is spent ends at
        the step just done: its last evaluation and checkpoint follow)."""
        steady = session_steps - 1
        if steady < MIN_STEADY:
            return current
        per_step = (session_s - first_step_s) / steady
        if per_step <= 0:
            return current
        fit = self.seconds / per_step
        return max(done, math.floor(fit + 1e-9 * fit))  # 1.2 s at 0.1 s is 12 steps, not float division's 11
