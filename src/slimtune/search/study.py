"""`slimtune search`: an Optuna study over the space of space.py, each trial one run of the job.

    lock OUT -> preflight (data, metric, space, budget) -> open OUT/study.db (Optuna RDB storage)
    -> settle what a killed earlier session left -> ask / run / tell until N trials or the time
    budget (trial.py: one trial) -> the seed spread of the top configs (seeds.py) -> the pick (or the
    Pareto front) measured once on the test split -> report.py

Why trials run in this process (not one subprocess each): pruning is a callback into the trainer's
own evaluations (`run_train(on_evaluate=...)` reports the metric at each rung and stops the run when
the pruner says so), the study needs no inter-process channel, and a kill of the search kills its
trial with it (no orphan keeps training into a folder the next session must use). The cost: the
process's peak memory is not a per-trial figure, so search tables report step time, not memory
(`slimtune compare` runs each method in its own process and does report it).

Resuming: the study lives in OUT/study.db. OUT is locked for the life of a search (train/lock.py),
so a trial still RUNNING in the storage when a search starts was cut off by a kill: it is marked
failed ("interrupted") and its parameters queued to run first; that retry continues the run from its
last checkpoint (a trial cut by --timeout, or whose worker lost the store, too), so promising trials
are continued, never trained again from step 0. Within a session no trial is restarted either: the
pruner (successive halving / Hyperband, asynchronous) decides at each evaluation rung whether the
running trial goes on, so a promoted trial simply keeps training. Completed
and pruned trials stay; the count and the time budget continue where they were. A resumed search
whose config or space differs from the stored one is refused, naming the differences.

Selection uses the validation split only (the trial's best validation metric is its value; the
pruner sees validation metrics). The test split is evaluated once, for the reported best trial(s).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..train.config import JobConfig, saved_form
from . import budget as BU
from .pruning import pruner as _pruner  # noqa: F401 - tests import it from here
from . import prepare as P
from . import storage as ST
from . import trial as TR
from .space import SearchError, build_space, parse_section
from .trial import TRIAL_ERRORS, trial_dir  # noqa: F401 - the names callers import from here
from . import warmstart as WS

STUDY_NAME = "slimtune-search"
# a space where draws keep landing above --max-trainable-pct: stop and say so rather than spin (a skip
# costs one weightless count, about a second)
MAX_SKIPS_IN_A_ROW = 50


PARETO_WITH = ("params", "step_time")


@dataclass
class SearchOptions:
    out: Path
    trials: int = 20
    timeout_min: Optional[float] = None
    objective: Optional[str] = None  # a metric, or "pareto"
    pareto_with: str = "params"  # the second objective of a Pareto search: trainable % or step time
    max_trainable_pct: Optional[float] = None
    keep_all: bool = False  # keep pruned / failed trials' folders and every checkpoint
    test_fraction: Optional[float] = None
    overwrite: bool = False
    storage: Optional[str] = None  # None: OUT/study.db; postgresql://..., journal:PATH (storage.py)
    workers: int = 1  # local worker processes on the study, this one included (pool.py)
    heartbeat_s: int = 10  # with several workers: a trial silent for 3 beats is failed and run again
    study: str = STUDY_NAME
    seeds: int = 3  # training seeds each of the `top` best configs runs under (seeds.py); 1: no spread
    top: int = 3
    role: str = "main"  # "worker": a process pool.py started: no lock, no settling, no report
    budget_min: Optional[float] = None  # training time per trial at its own step time (budget.py), not steps
    clock: str = "auto"  # the budget's clock (prepare.resolve_clock)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchError("slimtune search runs on Optuna, which is not installed: pip install 'slimtune[search]' "
                          "(or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def run_search(cfg: JobConfig, opts: SearchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the search in opts.out; returns the summary report.py writes."""
    optuna = _optuna()
    if opts.trials < 1:
        raise SearchError(f"--trials {opts.trials}: a search needs at least 1 trial")
    if opts.pareto_with not in PARETO_WITH:
        raise SearchError(f"--pareto-with {opts.pareto_with!r}: choose {' or '.join(PARETO_WITH)}")
    if opts.workers < 1:
        raise SearchError(f"--workers {opts.workers}: give 1 or more worker processes")
    if opts.seeds < 1 or opts.top < 1:
        raise SearchError(f"--seeds {opts.seeds} --seed-top {opts.top}: give 1 or more (--seeds 1: no spread over seeds)")
    if opts.role == "worker":
        return _search(optuna, cfg, opts, opts.out, log)
    from .tracking import parent_runs

    with P.owned_folder(opts.out) as out:
        if opts.overwrite:
            for p in ("study.db", "trials", "search.md", "search.csv", "best.yaml", "pareto", "plots", "trackers.json"):
                q = out / p
                shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
        with parent_runs(cfg.train.report_to, out, "search", saved_form(cfg), log):  # one tracker run per trial
            return _search(optuna, cfg, opts, out, log)


def _search(optuna, cfg: JobConfig, opts: SearchOptions, out: Path, log) -> dict[str, Any]:
    from ..train.resources import set_cpu_threads

    t_session = time.time()
    load_start = os.getloadavg()
    spec = ST.parse(opts.storage, out)
    # a heartbeat wherever a RUNNING trial may belong to a live process elsewhere
    beat = opts.heartbeat_s if (spec.shared or opts.workers > 1 or opts.role == "worker") else None
    storage = ST.open_storage(optuna, spec, beat)
    main = opts.role == "main"
    section = parse_section(cfg.search, "search")
    if opts.max_trainable_pct is not None:
        section = section.model_copy(update={"max_trainable_pct": opts.max_trainable_pct})
    pareto = opts.objective == "pareto"
    budget = BU.make(opts.budget_min, opts.clock, section.rungs)
    cfg = P.with_test_split(cfg, opts.test_fraction, log)
    pf = P.preflight(cfg, None if pareto else (opts.objective or section.metric), log)
    space = build_space(section, pf.task, pf.blocks)
    threads = set_cpu_threads(cfg.train.cpu_threads, P.quiet)
    every = min(cfg.train.eval_every or pf.total_steps, max(1, math.ceil(pf.total_steps / section.rungs)))
    base = P.derive(cfg, {"search": None, "resume": False, "overwrite": True, "resume_weights_only": False,
                          "train": {"eval_every": every, "eval_before": False, "metric": pf.metric,
                                    "cpu_threads": threads},
                          "eval": {"samples": 0}})
    log("search space: " + "; ".join(space.describe()))
    directions = ["maximize" if pf.metric_max else "minimize"] + (["minimize"] if pareto else [])
    fingerprint = {"config": _fingerprint(base), "space": space.to_dict(), "metric": pf.metric, "pareto": pareto,
                   "pareto_with": opts.pareto_with if pareto else None, "max_trainable_pct": section.max_trainable_pct,
                   "budget": budget.to_dict() if budget else None}
    existing = [s for s in optuna.get_all_study_summaries(storage) if s.study_name == opts.study]
    if existing and opts.overwrite and spec.shared and main:
        optuna.delete_study(study_name=opts.study, storage=storage)
        log(f"--overwrite: deleted the study {opts.study!r} in {spec.shown}")
        existing = []
    n_before = existing[0].n_trials if existing else 0
    # a resumed session draws new points, not the first session's again; processes sharing a study each
    # draw their own (the same seed would give every worker the same random start-up points), and TPE's
    # constant liar keeps a worker from drawing next to the trials the others are running
    parallel = beat is not None
    sampler = optuna.samplers.TPESampler(
        seed=cfg.train.seed + n_before + (os.getpid() if parallel else 0),
        n_startup_trials=section.startup_trials if section.startup_trials is not None else max(3, min(10, opts.trials // 4)),
        multivariate=True, group=True, constant_liar=parallel)
    study = optuna.create_study(study_name=opts.study, storage=storage, load_if_exists=True, directions=directions,
                                sampler=sampler, pruner=_pruner(optuna, section, *(budget.pruner_range() if budget else
                                                                             (every, pf.total_steps)), pareto))
    where = f"'{out}'" if not spec.shared else f"the study {opts.study!r} in {spec.shown}"
    if existing or not main:
        _same_search(study, fingerprint, where, spec.shared)
        if main:
            log(f"resuming the search in {where}: {n_before} trial(s) in the study")
    else:
        for k, v in fingerprint.items():
            study.set_user_attr(k, v)
        study.set_user_attr("elapsed_s", 0.0)
        # the first start is queued now, the others one at a time when nothing is queued (warmstart.queue_next), so a
        # retry queued meanwhile (a cut or killed trial) still runs first; no more starts than --trials
        starts = WS.starts(space, cfg, pf.task, section.max_trainable_pct, WS.counter(pf, base))[: opts.trials]
        study.set_user_attr("later_starts", [list(x) for x in starts[1:]])
        if starts:
            WS.queue(study, *starts[0], log)
    if not spec.shared and main:  # OUT is locked: whatever is RUNNING in OUT/study.db was cut off
        _recover(optuna, study, storage, out, log)

    done = TR.counted(study)
    if main and opts.workers > 1 and opts.workers > opts.trials - done:
        raise SearchError(f"--workers {opts.workers} is more than the {opts.trials - done} trial(s) left of --trials "
                          f"{opts.trials} ({done} done): a worker would have nothing to run; use --workers "
                          f"{max(1, opts.trials - done)} or raise --trials")
    elapsed0 = float(study.user_attrs.get("elapsed_s", 0.0))
    budget_s = opts.timeout_min * 60 if opts.timeout_min else None
    estimate = _trial_estimate(study) or study.user_attrs.get("trial_estimate_s")
    if budget_s is not None and estimate is None and done < opts.trials:
        t = P.time_run(base, out / "timing")
        estimate = t.run_s(pf.total_steps, P.evals_of(pf.total_steps, every, pf.total_steps)) if budget is None else \
            BU.estimate_s(budget, t)
        extra = _seed_runs(opts, pareto, 1)
        P.check_budget("--timeout", budget_s - elapsed0, estimate * (1 + extra),
                       (f"one trial ({pf.total_steps} steps, an evaluation every {every})" if budget is None else
                        f"one trial ({budget.seconds / 60:g} min of training on the {budget.clock} clock, its timing run "
                        "and evaluations)")
                       + (f" and the {extra} seed-spread runs after it (--seeds 1: none)" if extra else ""))
        log(f"timing: about {estimate:.0f} s a full trial (set-up {t.setup_s:.0f} s, {t.step_s:.2f} s/step, "
            f"{t.eval_s:.1f} s/evaluation)")
        study.set_user_attr("trial_estimate_s", estimate)
    procs = []
    if main and opts.workers > 1:
        from . import pool

        procs = pool.spawn(cfg, opts, opts.workers - 1, out)
        log(f"started {len(procs)} more worker process(es) on {spec.shown} (logs in {out}/workers/)")
    try:
        stop_why = _loop(optuna, study, storage, space, pf, base, out, opts, section, log, beat, budget_s, elapsed0,
                         t_session, estimate, budget)
    except ST.errors(optuna, spec.kind == "journal") as e:
        if procs:
            pool.stop(procs)
        if not spec.shared:
            raise
        raise SearchError(f"this worker lost the study storage {spec.shown} ({ST.first_line(e)}); a trial it was running "
                          "runs again once the store is back: run the same command again then") from None
    except BaseException:
        if procs:
            pool.stop(procs)
        raise
    log(f"{'worker' if not main else 'search'} stopped: {stop_why}")
    if not main:
        return {"stop_why": stop_why}
    if procs:
        bad = pool.wait(procs, out, log)
        if bad:
            log(f"{len(bad)} worker(s) failed; their trials were run again by the others")
    summary = _finish(optuna, study, pf, space, cfg, base, out, opts, pareto, section, every, log)
    summary.update(load_start=load_start, load_end=os.getloadavg(), session_s=time.time() - t_session,
                   stop_why=stop_why, threads=threads, storage_shown=spec.shown, budget=budget)
    from .report import write_search

    write_search(summary, out)
    if summary["best"] is None:
        raise SearchError(f"no trial of the search in {out} finished ({out}/search.md lists each trial and why it "
                          "stopped): widen the space, raise --trials / --timeout, or fix the errors it names")
    log(f"wrote {out}/search.md, {out}/search.csv, {out}/best.yaml and plots in {out}/plots")
    b, te = summary["best"], summary["tests"].get(str(summary["best"].number)) or {}
    log(f"best: trial {b.number}, validation {pf.metric} {b.values[0]:.4f}; test {pf.metric} "
        f"{te.get(pf.metric, float('nan')):.4f} (measured once, {te.get('n_test')} test examples)")
    return summary


def _loop(optuna, study, storage, space, pf, base, out, opts, section, log, beat, budget_s, elapsed0, t_session,
          estimate, budget=None) -> str:
    """Ask / run / tell until the count or the budget is reached; why it stopped.

    With several workers: trials RUNNING elsewhere count toward --trials while they run, so the last
    trials are not started twice over; a worker with nothing left to start waits for them (each
    ends, or goes stale and is queued again, within its run or three heartbeats) before it stops."""
    if opts.role == "worker" or opts.workers > 1 or beat is not None:
        log(f"worker {socket.gethostname()}:{os.getpid()} joined the study ({TR.counted(study)} of {opts.trials} trials "
            "done)")
    skips = 0  # draws in a row above max_trainable_pct; they cost no training but must not go on forever
    while True:
        if beat is not None:
            ST.fail_stale(optuna, study)
        done = TR.counted(study)
        if done >= opts.trials:
            return f"{done} trials done"
        if skips >= MAX_SKIPS_IN_A_ROW:
            return (f"{skips} draws in a row were above max_trainable_pct {section.max_trainable_pct:g}%: lower "
                    "the ranks or narrow the targets/layers in the search space, or raise --max-trainable-pct")
        spent = elapsed0 + (time.time() - t_session)
        if budget_s is not None:
            est = _trial_estimate(study) or estimate or 0.0
            # the seed spread after the trials: for the configs there will be once this trial is done
            reserve = _seed_runs(opts, len(study.directions) > 1, _complete(study) + 1) * est
            if spent + est + reserve > budget_s:
                return (f"time budget: {spent / 60:.1f} of {budget_s / 60:.1f} min spent, a trial takes about "
                        f"{est / 60:.1f} min" + (f", {reserve / 60:.1f} min kept for the seed spread" if reserve else ""))
        if beat is not None and done + TR.running(study) >= opts.trials:
            time.sleep(min(2.0, beat))  # the others' trials finish the count (or go stale and come back)
            continue
        deadline = None if budget_s is None else t_session + (budget_s - elapsed0)
        if opts.role == "main":  # the local workers leave it to the process that started them (fewer races)
            WS.queue_next(study, log)
        skips = skips + 1 if TR.one_trial(optuna, study, storage, space, pf, base, out, opts, section, done, log,
                                        deadline, beat, budget) else 0
        prev = float(study.user_attrs.get("elapsed_s", 0.0))
        study.set_user_attr("elapsed_s", max(prev, elapsed0 + (time.time() - t_session)))


def _seed_runs(opts: SearchOptions, pareto: bool, configs: int) -> int:
    """Runs the seed spread adds after the trials (seeds.py): (seeds - 1) for each of the top configs,
    of which there are at most `configs` (the completed trials)."""
    return 0 if pareto or opts.role != "main" else (opts.seeds - 1) * min(opts.top, configs)


def _complete(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _fingerprint(base: JobConfig) -> dict[str, Any]:
    d = saved_form(base)
    for k in ("output_dir", "method"):  # where it goes, and what each trial draws
        d.pop(k, None)
    d["train"].pop("cpu_threads", None)  # the machine, not the search
    d["train"].pop("lr", None)
    return json.loads(json.dumps(d, default=str))


def _same_search(study, fp: dict[str, Any], where: str, shared: bool = False) -> None:
    from ..train.rundir import config_diff

    old = {k: study.user_attrs.get(k) for k in fp}
    if old == json.loads(json.dumps(fp, default=str)):
        return
    diffs = []
    if old.get("config") != fp["config"]:
        diffs += config_diff(old.get("config") or {}, fp["config"])
    for k in fp:
        if k != "config" and old.get(k) != json.loads(json.dumps(fp[k], default=str)):
            diffs.append(f"{k}: {old.get(k)!r} -> {fp[k]!r}")
    other = "give another --study NAME" if shared else "choose another --out"
    raise SearchError(f"{where} holds a search of another config or space ({'; '.join(diffs[:6]) or 'settings differ'}); "
                      f"run the same command to continue it, {other}, or add --overwrite to start over")


def _trial_estimate(study) -> float | None:
    """Seconds a full trial takes: the median of the completed trials of this study."""
    from optuna.trial import TrialState

    ds = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
          if t.duration is not None]
    return statistics.median(ds) if ds else None


def _recover(optuna, study, storage, out: Path, log) -> None:
    """Trials a killed session left RUNNING: failed as interrupted, folders removed, parameters queued again."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", "the search process was stopped during this trial")
        study.tell(t.number, state=TrialState.FAIL)
        kept = TR.checkpoint_of(TR.trial_dir(out, t.number))
        if kept is None:
            shutil.rmtree(TR.trial_dir(out, t.number), ignore_errors=True)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        log(f"trial {t.number} was cut off by the end of the last session: it runs again first, "
            + (f"continued from its checkpoint at step {kept[1]}" if kept else "from step 0 (no checkpoint was written)"))
    shutil.rmtree(out / "timing", ignore_errors=True)


def _finish(optuna, study, pf, space, cfg: JobConfig, base: JobConfig, out: Path, opts: SearchOptions, pareto: bool,
            section, every: int, log=print) -> dict[str, Any]:
    from optuna.trial import TrialState

    common = {"study": study, "pf": pf, "space": space, "pareto": pareto, "pareto_with": opts.pareto_with,
              "section": section, "every": every, "trials_target": opts.trials, "timeout_min": opts.timeout_min,
              "base": base, "elapsed_s": float(study.user_attrs.get("elapsed_s", 0.0))}
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return {**common, "best": None, "chosen": [], "tests": {}, "best_config": None, "spread": [], "seed_tests": {}}
    chosen = sorted(study.best_trials, key=lambda t: t.values[0], reverse=pf.metric_max) if pareto else [study.best_trial]
    spread, seed_tests = [], {}
    if not pareto and opts.seeds > 1:
        from . import seeds as SD

        done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.values[0],
                      reverse=pf.metric_max)
        top = [t for t in done if (TR.trial_dir(out, t.number) / "best").is_dir()][:opts.top]
        if top:
            def folder(n: int) -> Path:
                return TR.trial_dir(out, n)

            spread, pick = SD.spread(study, top, opts.seeds, lambda t: TR.trial_config(base, t, out), folder,
                                     pf.metric_max, log)
            chosen = [pick]
            seed_tests = SD.measure_pick(study, pick, opts.seeds, lambda t: TR.trial_config(base, t, out), folder)
    tests = dict(study.user_attrs.get("test") or {})
    for t in chosen[:8]:
        key = str(t.number)
        if key not in tests:  # measured once per reported trial, kept in the study
            if not (TR.trial_dir(out, t.number) / "best").is_dir():  # run by a worker on another machine: its
                continue  # adapter is there, and that machine's command measures it when it finishes
            tcfg = TR.trial_config(base, t, out)
            tests[key] = P.measure_test(tcfg, TR.trial_dir(out, t.number))
            study.set_user_attr("test", tests)
    best = chosen[0]
    best_cfg = TR.trial_config(base, best, out).model_copy(deep=True)
    best_yaml = P.derive(best_cfg, {"output_dir": str(out / "best-run"),
                                    "train": {"eval_before": cfg.train.eval_before},
                                    "eval": {"samples": cfg.eval.samples}})
    return {**common, "best": best, "chosen": chosen, "tests": tests, "best_config": best_yaml, "spread": spread,
            "seed_tests": seed_tests}
