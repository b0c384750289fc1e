"""The search's pruner: successive halving or Hyperband on the evaluation rungs, after a warm-up.

The rungs' unit is whatever the trials report as Optuna's `step`: training steps, or under
`--budget-minutes` milliseconds of clock time trained (budget.py), so trials of different step times
meet at the same rung after the same training time.
"""
from __future__ import annotations


def pruner(optuna, section, every: int, total: int, pareto: bool):
    """Successive halving / Hyperband on the evaluation rungs (the first at `every` steps), after a
    warm-up: a trial is pruned at a step only once `warmup_trials` earlier trials have reached that step
    (Optuna's own bootstrap_count prunes *during* its bootstrap, which is the opposite). Optuna does not
    prune multi-objective studies, so a Pareto search runs every trial to the end."""
    if pareto or section.pruner == "none":
        return optuna.pruners.NopPruner()
    if section.pruner == "hyperband":
        inner = optuna.pruners.HyperbandPruner(min_resource=every, max_resource=total,
                                               reduction_factor=section.reduction_factor)
    else:
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=every, reduction_factor=section.reduction_factor)
    return after_warmup(optuna)(inner, section.warmup_trials)


def after_warmup(optuna):
    from optuna.trial import TrialState

    class AfterWarmup(optuna.pruners.BasePruner):
        """`inner`'s decision, once `n` other finished trials reached this trial's step. The inner
        pruner is always asked, so it records every rung's value for the trials that come later."""

        def __init__(self, inner, n: int) -> None:
            self.inner, self.n = inner, n

        def prune(self, study, trial) -> bool:
            if not self.inner.prune(study, trial):
                return False
            step = trial.last_step
            reached = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                       if t.number != trial.number and t.last_step is not None and t.last_step >= step]
            return len(reached) >= self.n

    return AfterWarmup
