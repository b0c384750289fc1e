"""One trial of `slimtune search`: ask the study for a point, run the job on it, tell the result.

    ask -> (a retry: continue the earlier trial's run from its checkpoint) -> count trainable
    parameters (skip above max_trainable_pct) -> run the job with a callback at each evaluation
    (report the rung to the pruner; stop when pruned, past --timeout or the store is lost) -> tell

The study session around it (open, resume, the loop over trials, the seed spread, the report) is
study.py; this module is what happens to a single point: how it is run, stopped, continued and kept.
A trial is never trained twice from step 0: one cut by --timeout, killed, or whose worker lost the
store keeps its folder with the checkpoint of the evaluation it stopped at, and its retry continues
that run (`continue_from`), reporting the earlier rung values again so the pruner sees one curve.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..train.config import JobConfig
from . import budget as BU
from . import prepare as P
from . import storage as ST
from .space import SearchError, Space, method_block

if TYPE_CHECKING:
    from .study import SearchOptions

def _trial_errors() -> tuple[type[BaseException], ...]:
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..targeting import TargetError
    from ..train.config import JobConfigError
    from ..train.datafiles import DataError

    return (JobConfigError, DataError, ConfigError, TargetError, CheckpointError)


TRIAL_ERRORS = _trial_errors()

def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"trial-{number:04d}"

def checkpoint_of(folder: Path) -> tuple[Path, int] | None:
    """The latest complete checkpoint of a trial's run folder and its step, or None."""
    from ..train.rundir import checkpoints

    cks = checkpoints(folder) if folder.is_dir() else []
    return (cks[-1], int(cks[-1].name.rsplit("-", 1)[-1])) if cks else None

def continue_from(study, trial, out: Path, folder: Path, pareto: bool, plan: dict | None = None) -> int | None:
    """A retried trial (`retry_of`: cut by --timeout, killed, or its worker lost) takes over the earlier
    trial's folder when it has a checkpoint: the run resumes there (same parameters, so the same run
    config), and the earlier trial's rung values up to that step are reported again, so the pruner sees
    this trial's whole curve. The step it continues from, or None (a run from step 0)."""
    prior = trial.user_attrs.get("retry_of")
    if prior is None:
        return None
    old = trial_dir(out, int(prior))
    kept = checkpoint_of(old)
    if kept is None:
        shutil.rmtree(old, ignore_errors=True)
        return None
    if old != folder:
        shutil.rmtree(folder, ignore_errors=True)
        old.rename(folder)
    at = kept[1]
    if not pareto:
        before = next((t for t in study.get_trials(deepcopy=False) if t.number == int(prior)), None)
        for step, v in sorted((before.intermediate_values if before is not None else {}).items()):
            if step <= BU.resource(at, plan):  # rung keys: steps, or clock ms under a budget (budget.py)
                trial.report(float(v), step)
    return at

def describe(params: dict[str, Any]) -> str:
    """A trial's draw in one line: method, then the keys it drew (space.METHOD_KEYS), then lr."""
    bits = [params["method"]]
    if "r" in params:
        bits += [f"r={params['r']}", f"α/r={params['alpha_over_r']:g}"]
    if "targets" in params:
        layers = params["layers"]
        bits += [str(params["targets"]), f"layers {layers if isinstance(layers, str) else ','.join(map(str, layers))}"]
    if "dropout" in params:
        bits.append(f"dropout {params['dropout']:g}")
    if params.get("rslora"):
        bits.append("rsLoRA")
    if params.get("mlp_r_factor", 1.0) != 1.0:
        bits.append(f"MLP r×{params['mlp_r_factor']:g}")
    bits.append(f"lr {params['lr']:.2e}")
    return " ".join(bits)


def one_trial(optuna, study, storage, space: Space, pf, base: JobConfig, out: Path, opts: SearchOptions,
               section, done: int, log, deadline: float | None = None, beat: int | None = None,
               budget: BU.Budget | None = None) -> bool:
    """Ask for one trial, run it, tell its result; True when it was skipped (above max_trainable_pct).

    `deadline` (time.time() at which --timeout runs out): a trial still running at an evaluation past
    it is cut there, as a kill would cut it (failed as interrupted, its settings queued to run first
    in the next session), so a slow trial overshoots the budget by one evaluation interval at most.

    `beat` (seconds, several workers): the trial beats while it trains (storage.Heartbeat); a worker
    that loses the store stops the trial at its next evaluation and exits with a message, telling
    nothing, so the store fails the trial as stale once it is back and another worker runs it again.

    `budget` (--budget-minutes): the trial trains that much clock time at its own step time (budget.py);
    its evaluations are reported to the pruner at the clock time trained, so rungs compare equal time."""
    from optuna.trial import TrialState

    from ..train.interrupt import TrainingInterrupted
    from ..train.trainer import TrainingDiverged

    with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": we beat ourselves
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    if beat is not None:
        frozen = storage.get_trial(trial._trial_id)
        retry_of = frozen.system_attrs.get("failed_trial")
        queued = bool(frozen.params) or "fixed_params" in frozen.system_attrs
        if retry_of is not None:  # a worker died during it: it runs again, from its checkpoint if on this machine
            trial.set_user_attr("retry_of", retry_of)
        if not queued and ahead(study, trial.number) >= opts.trials:  # another worker asked at the same moment
            storage.set_trial_user_attr(trial._trial_id, "interrupted", "not run: the count was reached by the "
                                        "trials other workers had started")
            study.tell(trial, state=TrialState.FAIL)
            return False
        copy_of = earlier_copy(study, frozen) if frozen.user_attrs.get("warm_start") and retry_of is None else None
        if copy_of is not None:
            # two processes queued the same warm start at one moment (Optuna's skip_if_exists is not atomic)
            storage.set_trial_user_attr(trial._trial_id, "interrupted", f"not run: trial {copy_of} "
                                        "is the same warm start, queued by another process at the same moment")
            study.tell(trial, state=TrialState.FAIL)
            return False
    params = space.sample(trial)
    folder = trial_dir(out, trial.number)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
    block = method_block(params, pf.blocks, pf.total_steps)
    trial.set_user_attr("params", params)
    trial.set_user_attr("method_block", block)
    tcfg = P.derive(base, {"method": block, "train": {"lr": float(params["lr"])}, "output_dir": str(folder)})
    head = f"trial {trial.number} ({done + 1}/{opts.trials}): {describe(params)}"
    pareto = len(study.directions) > 1
    limit = section.max_trainable_pct
    counts = P.count_trainable(pf, tcfg) if limit is not None else None
    if counts is not None:
        trial.set_user_attr("trainable_pct", counts[2])
        if counts[2] > limit:
            trial.set_user_attr("reason", f"{counts[2]:.3f}% trainable is above max_trainable_pct {limit:g}")
            trial.set_user_attr("skipped", True)
            # PRUNED, not FAIL: TPE ranks a pruned point below every finished one and draws away from it
            study.tell(trial, state=TrialState.PRUNED)
            log(f"trial {trial.number}: {describe(params)}: skipped, {counts[2]:.3f}% trainable > {limit:g}% "
                "(not counted toward --trials)")
            return True
    plan = None
    if budget is not None:
        try:
            tcfg, plan, block = BU.fit_trial(budget, study, params, pf, tcfg, block, folder, prior_plan(study, trial))
        except SearchError as e:  # slower than the whole budget: ranked below every finished trial, like a skip
            trial.set_user_attr("reason", f"too slow: {e}")
            study.tell(trial, state=TrialState.PRUNED)
            log(f"{head}: too slow for the budget: {e}")
            return False
        trial.set_user_attr("budget_plan", plan)
        trial.set_user_attr("method_block", block)
        head += f" [{plan['steps']} steps at {plan['step_s']:.2f} s/step, {plan['clock']} clock]"
    at = continue_from(study, trial, out, folder, pareto, plan)
    if at is not None:  # the retry of a trial that was cut, killed or lost: its run goes on, not from step 0
        tcfg = P.derive(tcfg, {"resume": True, "overwrite": False})
        trial.set_user_attr("continued_at", at)
        log(f"{head}: continues trial {trial.user_attrs['retry_of']}'s run from its checkpoint at step {at}")
    pruned: list[str] = []
    cut: list[int] = []
    hb = ST.Heartbeat(storage, trial._trial_id, beat)

    def on_evaluate(step: int, metrics: dict) -> str | None:
        if hb.lost:
            return f"lost the study storage ({hb.lost})"
        v = metrics.get(pf.metric)
        try:  # the value first: a retry that continues this run reports it again (continue_from)
            if v is not None and not pareto:
                trial.report(float(v), BU.resource(step, plan))
            if deadline is not None and time.time() > deadline and step < tcfg.train.max_steps:
                cut.append(step)
                return "cut by the search's time budget (--timeout); it continues first when the search resumes"
            stop = v is not None and not pareto and trial.should_prune()
        except ST.errors(optuna) as e:  # the store went away: stop here; the heartbeat stops too
            hb.lost = hb.lost or ST.first_line(e)
            return f"lost the study storage ({hb.lost})"
        if stop:
            pruned.append(f"{pf.metric} {v:.4f} at step {step}")
            return f"pruned by the search ({section.pruner}): {pf.metric} {v:.4f}"
        return None

    t0 = time.time()
    try:
        with hb:
            res = P.run_once(tcfg, on_evaluate=on_evaluate)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM (TrainingInterrupted is one): the trial runs again next time
        storage.set_trial_user_attr(trial._trial_id, "interrupted", "stopped by Ctrl-C / SIGTERM")
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        if checkpoint_of(folder) is None:  # with one, the retry continues it (continue_from)
            shutil.rmtree(folder, ignore_errors=True)
        raise TrainingInterrupted(f"search interrupted during trial {trial.number}: {done} trial(s) done are kept in "
                                  f"{out}/study.db; run the same command again to continue (trial {trial.number}'s "
                                  "settings run first)", getattr(e, "signum", 2)) from None
    except TrainingDiverged as e:  # a learning rate too high: a bad result the sampler should learn from
        trial.set_user_attr("reason", f"diverged: {str(e)[:200]}")
        study.tell(trial, state=TrialState.PRUNED)
        log(f"{head}: diverged ({time.time() - t0:.0f} s)")
        clean(folder, keep=opts.keep_all)
        return False
    except TRIAL_ERRORS as e:  # this trial's config cannot run (a method that fits nothing here): record it, go on
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        trial.set_user_attr("reason", f"error: {msg[:300]}")
        study.tell(trial, state=TrialState.FAIL)
        log(f"{head}: failed: {msg[:200]}")
        clean(folder, keep=opts.keep_all)
        return False
    except BaseException:  # a bug, or the machine: the trial is not left RUNNING for the next session to guess
        study.tell(trial, state=TrialState.FAIL)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    took = time.time() - t0
    if hb.lost:  # tell nothing: the store fails the trial as stale and queues it again once it is back; its
        # folder stays, with the checkpoint of the evaluation it stopped at, for the retry to continue
        raise SearchError(f"trial {trial.number} stopped: this worker lost the study storage ({hb.lost}). The trial "
                          "runs again once the store is back (another worker, or this command run again)")
    if cut:
        storage.set_trial_user_attr(trial._trial_id, "interrupted", f"cut by the time budget at step {cut[0]}")
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        log(f"{head}: cut at step {cut[0]} by the time budget ({took:.0f} s); not counted, it continues from its "
            "checkpoint there first when the search resumes")
        return False
    trial.set_user_attr("result", res)
    if pruned:
        trial.set_user_attr("reason", f"pruned: {pruned[0]}")
        study.tell(trial, state=TrialState.PRUNED)
        log(f"{head}: pruned, {pruned[0]} ({took:.0f} s)")
        clean(folder, keep=opts.keep_all)
        return False
    if res["best"] is None:
        trial.set_user_attr("reason", "no evaluation")
        study.tell(trial, state=TrialState.FAIL)
        clean(folder, keep=opts.keep_all)
        return False
    values = [float(res["best"])]
    if pareto:
        values.append(float(res["trainable_pct"]) if opts.pareto_with == "params" else float(res["step_time_s"] or 0))
    study.tell(trial, values=values)
    if not opts.keep_all:
        P.strip_checkpoints(folder)
    best = best_value(study)
    log(f"{head}: {pf.metric} {res['best']:.4f} at step {res['best_step']}, {res['trainable_pct']:.3f}% trainable, "
        f"{took:.0f} s" + ("" if pareto or best is None else f" (best so far {best:.4f})"))
    return False

def best_value(study) -> float | None:
    try:
        return study.best_value if len(study.directions) == 1 else None
    except ValueError:
        return None

def clean(folder: Path, keep: bool) -> None:
    """A pruned or failed trial's folder goes whole (its curve and reason stay in study.db)."""
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)

def trial_config(base: JobConfig, t, out: Path) -> JobConfig:
    """A trial's run config again (its seed reruns, best.yaml): under a budget, with its own steps."""
    train: dict[str, Any] = {"lr": float(t.user_attrs["params"]["lr"])}
    plan = t.user_attrs.get("budget_plan")
    if plan:
        train.update(max_steps=plan["steps"], eval_every=plan["eval_every"], **BU.run_budget(plan))
    return P.derive(base, {"method": t.user_attrs["method_block"], "train": train,
                           "output_dir": str(trial_dir(out, t.number))})


def prior_plan(study, trial) -> dict | None:
    """The budget plan of the trial this one retries: a continued run keeps its schedule."""
    prior = trial.user_attrs.get("retry_of")
    if prior is None:
        return None
    before = next((t for t in study.get_trials(deepcopy=False) if t.number == int(prior)), None)
    return None if before is None else before.user_attrs.get("budget_plan")


def counted(study) -> int:
    """Trials that count toward --trials: finished, pruned, or failed on their own config (not cut off,
    not skipped above max_trainable_pct: a skip trains nothing, so `--trials 40` still trains 40)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = ST.retried_numbers(trials)  # a worker stopped beating during these: they ran again
    n = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not t.user_attrs.get("skipped"):
            n += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") and t.number not in retried:
            n += 1
    return n


def earlier_copy(study, frozen) -> int | None:
    """The number of an earlier trial queued as the same warm start (same fixed parameters) that is
    waiting, running or finished, or None. A failed one does not count: a killed or cut warm start has
    its own retry (which carries the warm start's attributes and is not a copy: the caller skips retries)."""
    from optuna.trial import TrialState

    fixed = frozen.system_attrs.get("fixed_params")
    for t in study.get_trials(deepcopy=False):
        if t.number >= frozen.number:
            break
        if t.user_attrs.get("warm_start") and t.system_attrs.get("fixed_params") == fixed and \
                t.state != TrialState.FAIL and t.system_attrs.get("failed_trial") is None:
            return t.number
    return None


def ahead(study, number: int) -> int:
    """Trials that count, or run and would count, started before trial `number`."""
    from optuna.trial import TrialState

    running = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.number < number and not t.user_attrs.get("skipped"))
    return counted(study) + running


def running(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not t.user_attrs.get("skipped"))
