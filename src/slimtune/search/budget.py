"""`slimtune search --budget-minutes B`: every trial gets the same training time, not the same steps.

    a trial's draw -> its step time on the budget's clock (a 3-step timing run of that config, cached
    per structure in the study) -> its steps: B / step time; an evaluation every B / rungs of clock
    -> the pruner's rungs in milliseconds of clock (Optuna's `step` of each reported value)

Why: the comparison the search feeds is at equal time (`compare --budget-minutes`), so a config that
is 2.7x slower per step (DoRA on every linear against LoRA on q/k/v) must pay for it with 2.7x fewer
steps inside the search too, or the search picks what only wins at equal steps (issue 28's SmolLM2
pick). Successive halving then compares trials at equal clock time: a rung is "B / rungs seconds of
training", whatever each trial's step count at that moment.

The clock (prepare.resolve_clock): `cpu` by default on CPU, the process's CPU seconds per step over its
threads, so a busy shared machine gives every trial the same compute; `wall` on a GPU.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import prepare as P
from .space import SearchError, method_block

MS = 1000  # the pruner's resource unit: milliseconds of clock (Optuna's steps are integers)
CACHE_ATTR = "step_s_by_structure"  # study user attr: {structure key: seconds per step on the clock}


@dataclass(frozen=True)
class Budget:
    seconds: float  # training time a trial gets, on `clock`
    clock: str  # "cpu" or "wall" (resolved)
    rungs: int  # evaluations over the budget: the pruner's rungs

    @property
    def every_s(self) -> float:
        return self.seconds / self.rungs

    def pruner_range(self) -> tuple[int, int]:
        """(min_resource, max_resource) of the pruner, in MS units of clock. The first rung sits at 0.9
        of the evaluation interval: a trial's evaluations land near k x every_s but not on it (its
        eval_every is whole steps: 39 steps of 0.77 s is 30.03 s, 23 of 1.3 s is 29.9 s), and a rung
        at exactly every_s would let the second trial pass its first rung only at its second
        evaluation, judged after twice the training time of the first."""
        return max(1, round(0.9 * self.every_s * MS)), max(1, round(self.seconds * MS))

    def plan(self, step_s: float) -> dict[str, Any]:
        """A trial's schedule from its seconds per step: None steps when one step exceeds the budget."""
        fit = self.seconds / step_s if step_s > 0 else 0.0
        steps = math.floor(fit + 1e-9 * fit)  # 1.2 s at 0.1 s/step is 12 steps, not float division's 11
        every = max(1, min(steps, round(self.every_s / step_s))) if steps else 0
        return {"steps": steps, "eval_every": every, "step_s": step_s, "clock": self.clock, "seconds": self.seconds}

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "clock": self.clock, "rungs": self.rungs}


def resource(step: int, plan: dict[str, Any] | None) -> int:
    """What the pruner sees for an evaluation at `step`: the step itself, or with a budget the clock
    time trained by then (ms), so rungs line up across trials of different step times."""
    return step if plan is None else round(step * plan["step_s"] * MS)


def run_budget(plan: dict[str, Any]) -> dict[str, Any]:
    """The train.* keys that hold a run to the budget on its own steady steps (train/clock_budget.py):
    the plan's steps are the timing run's guess, the run re-plans them as it goes. A plan from a study
    made before the re-plan has no seconds: its steps stay as they were."""
    return {"budget_s": plan["seconds"], "budget_clock": plan["clock"]} if plan.get("seconds") else {}


def make(minutes: float | None, clock: str, rungs: int) -> Budget | None:
    if minutes is None:
        return None
    if not minutes > 0 or not math.isfinite(minutes):
        raise SearchError(f"--budget-minutes {minutes:g}: give the training time per trial in minutes, above 0")
    return Budget(minutes * 60, P.resolve_clock(clock), rungs)


def estimate_s(budget: Budget, t: P.Timing) -> float:
    """Wall seconds one trial takes, from a timing run of the config as given: its own timing run, the
    budget (on the cpu clock, stretched by this machine's wall / cpu ratio now), its evaluations."""
    stretch = t.step_s / t.cpu_step_s if budget.clock == "cpu" and t.cpu_step_s > 0 else 1.0
    return 2 * t.setup_s + 3 * t.step_s + t.eval_s + budget.seconds * stretch + budget.rungs * t.eval_s


def structure_key(block: dict[str, Any], tcfg) -> str:
    """What a step's cost depends on: the method block without its learning-dynamics knobs (alpha and
    its pattern, rsLoRA's scale, dropout, the lr), plus the batch and length; two trials with one key
    share a timing."""
    shape = {k: v for k, v in block.items() if k not in ("lora_alpha", "alpha", "alpha_pattern", "lora_dropout",
                                                          "use_rslora", "total_step")}
    return json.dumps([shape, tcfg.train.batch_size, tcfg.train.grad_accum, tcfg.data.max_length], sort_keys=True,
                      default=str)


def fit_trial(budget: Budget, study, params: dict[str, Any], pf, tcfg, block: dict[str, Any], folder: Path,
              prior: dict | None):
    """(the trial's config with its own steps and evaluation grid, its plan, its method block). `prior`: the plan of the
    trial this one retries (its run continues, so its schedule must stay the same). Raises SearchError
    when one step does not fit the budget."""
    plan = prior
    if plan is None:
        key = structure_key(block, tcfg)
        cache = dict(study.user_attrs.get(CACHE_ATTR) or {})
        step_s = cache.get(f"{budget.clock}:{key}")
        if step_s is None:
            t = P.time_run(tcfg, folder.with_name(folder.name + "-timing"))
            step_s = t.budget_step_s(budget.clock)
            cache[f"{budget.clock}:{key}"] = step_s
            study.set_user_attr(CACHE_ATTR, cache)
        plan = budget.plan(step_s)
    if plan["steps"] < 1:
        raise SearchError(f"one step takes {plan['step_s']:.1f} s on the {budget.clock} clock, more than the "
                          f"{budget.seconds / 60:g} min budget")
    block = method_block(params, pf.blocks, plan["steps"])
    train = {"max_steps": plan["steps"], "eval_every": plan["eval_every"], **run_budget(plan)}
    return P.derive(tcfg, {"method": block, "train": train}), plan, block
