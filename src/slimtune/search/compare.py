"""`slimtune compare`: every method on the same data, split, steps (or training-time budget) and seed,
each with a learning rate chosen on the validation split, measured once on the test split.

    lock OUT -> preflight (data + test split, metric, methods) -> per row, one worker process
    (worker.py: lr probe -> the run -> the test split) -> compare.md / compare.csv / plots (report.py)

Rows: the config as given (its own method and lr: the hand-set baseline), then each method with the
keys of `space.METHOD_DEFAULTS`; DoRA takes the rank, alpha and targets the job chooses for LoRA, so
the two differ only by DoRA's magnitude. A method whose config cannot run on this model (BitFit on a
model without biases) is a row with its message.

The lr probe: a few short runs (a quarter of the steps, on the rows' evaluation grid) on a log grid
of half decades around the method's `space.METHOD_LR`, the best validation metric wins (ties: the
lower validation loss); when the best sits on an edge of the grid the grid grows that way (at most
twice); when the winner is not ahead on the metric the better half is continued to twice the steps
(successive halving). Each probe is the row's own run stopped early, so the winner's run is the row's
start (worker.py): the row trains its steps once. `--lr method=value` skips the probe for that method.

Why a process per row: the table reports each method's peak memory, which is a per-process figure
on CPU (ru_maxrss never goes down), and a method that crashes or leaks cannot touch the next one.
Workers die with the compare process (PR_SET_PDEATHSIG on Linux). A rerun of the same command keeps
the rows whose finished result matches what would run now (same config, method, lr rule) and runs
the rest: a stopped compare continues.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..train.config import JobConfig, saved_form
from ..train.trackers import NAME_ENV as TRACKERS_RUN_NAME
from . import prepare as P
from .space import METHOD_DEFAULTS, SearchError

MIN_BUDGET_STEPS = 5  # a training-time budget must hold at least this many steps of the as-given config


@dataclass
class CompareOptions:
    out: Path
    methods: list[str] = field(default_factory=lambda: ["all"])
    steps: Optional[int] = None  # train.max_steps for every row
    budget_min: Optional[float] = None  # training time per row (steps from the probe's step time)
    clock: str = "auto"  # the budget's clock (prepare.resolve_clock): cpu on CPU, wall on a GPU
    lrs: dict[str, float] = field(default_factory=dict)  # given learning rates: no probe for these
    probe: bool = True
    grid: int = 3  # probe points (half decades apart)
    probe_steps: Optional[int] = None
    test_fraction: Optional[float] = None
    as_given: bool = True  # the config's own method and lr as the first row
    rerun: bool = False  # run every row again, even one finished with the same settings
    seeds: int = 1  # each row's chosen config trained under this many training seeds (worker.seed_runs)


def resolve_methods(names: list[str]) -> list[str]:
    import difflib

    from ..registry import all_methods

    known = all_methods()
    out: list[str] = []
    if names == ["none"]:
        return []  # the config row alone
    for n in names:
        if n == "all":
            out += sorted(known)
            continue
        if n not in known:
            close = difflib.get_close_matches(n, sorted(known), n=1)
            raise SearchError(f"--methods: unknown method {n!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (methods: {', '.join(sorted(known))}, or all)")
        out.append(n)
    if not out:
        raise SearchError("--methods is empty: name methods (lora,dora,ia3) or all")
    return list(dict.fromkeys(out))


def lr_grid(center: float, points: int) -> list[float]:
    half = (points - 1) / 2
    return [float(f"{center * 10 ** ((k - half) / 2):.3g}") for k in range(points)]


def run_compare(cfg: JobConfig, opts: CompareOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    if opts.steps is not None and opts.budget_min is not None:
        raise SearchError("--steps and --budget-minutes both given: choose one (the same steps for every method, or "
                          "the same training time)")
    if opts.grid < 2:
        raise SearchError(f"--lr-grid {opts.grid}: the probe needs at least 2 learning rates (or --no-probe)")
    methods = resolve_methods(opts.methods)
    if not methods and not opts.as_given:
        raise SearchError("--methods none with --no-config-row leaves no row to run; drop one of them")
    if opts.seeds < 1:
        raise SearchError(f"--seeds {opts.seeds}: give 1 or more training seeds per row")
    unknown = sorted(set(opts.lrs) - set(methods) - {"config"})
    if unknown:
        raise SearchError(f"--lr {unknown[0]}=...: {unknown[0]!r} is not among --methods ({', '.join(methods)})")
    from .tracking import parent_runs

    with P.owned_folder(opts.out) as out, parent_runs(cfg.train.report_to, out, "compare", saved_form(cfg), log):
        return _compare(cfg, opts, methods, out, log)


def _compare(cfg: JobConfig, opts: CompareOptions, methods: list[str], out: Path, log) -> dict[str, Any]:
    from ..train.resources import set_cpu_threads

    t0 = time.time()
    load_start = os.getloadavg()
    cfg = P.with_test_split(cfg, opts.test_fraction, log)
    if opts.steps is not None:
        cfg = P.derive(cfg, {"train": {"max_steps": opts.steps}})
    pf = P.preflight(cfg, None, log)
    threads = set_cpu_threads(cfg.train.cpu_threads, P.quiet)
    base = P.derive(cfg, {"search": None, "resume": False, "overwrite": True, "resume_weights_only": False,
                          "train": {"metric": pf.metric, "cpu_threads": threads},
                          "eval": {"samples": 0}})  # generated samples are not in the tables; they cost each probe
    budget_s = opts.budget_min * 60 if opts.budget_min is not None else None
    clock = P.resolve_clock(opts.clock) if budget_s is not None else None
    if budget_s is not None:
        t = P.time_run(base, out / "timing")
        step_s = t.budget_step_s(clock)
        P.check_budget("--budget-minutes", budget_s, MIN_BUDGET_STEPS * step_s,
                       f"{MIN_BUDGET_STEPS} training steps of the config as given ({step_s:.2f} s/step, {clock} clock)")
        log(f"budget: {opts.budget_min:g} min of training per method on the {clock} clock (measured {step_s:.2f} "
            f"s/step for the config as given, {t.step_s:.2f} s/step wall); each row's steps come from its own step "
            "time (a 3-step timing run before its probe, its first step left out)")
    # a quarter of the run, at least 10 steps (fewer barely move a fresh classifier head off the majority class),
    # on the rows' evaluation grid: a probe is the row's own run stopped at an evaluation, continued later
    probe_steps = opts.probe_steps or min(pf.total_steps, max(10, round(pf.total_steps / 4)))
    every = base.train.eval_every
    if opts.probe and (every is None or every > probe_steps):
        every = probe_steps
        base = P.derive(base, {"train": {"eval_every": every}})
    probe_steps = min(pf.total_steps, math.ceil(probe_steps / every) * every)
    rows = ([("config", None)] if opts.as_given else []) + [(m, m) for m in methods]
    dora_like = _lora_choice(pf, base)
    results = []
    for i, (name, method) in enumerate(rows, 1):
        block = _block(method, base, dora_like)
        if method == "adalora" and isinstance(block, dict):  # its rank schedule runs over the row's steps
            block = {**block, "total_step": pf.total_steps}
        lr = cfg.train.lr if method is None else opts.lrs.get(name)
        grid = None if lr is not None or not opts.probe else lr_grid(_center(method), opts.grid)
        if lr is None and grid is None:
            lr = _center(method)
        run_cfg = P.derive(base, {"method": block, "output_dir": str(out / "runs" / name)})
        spec = {"name": name, "label": _label(name, block, cfg), "config": saved_form(run_cfg), "lr": lr, "grid": grid,
                "probe_steps": probe_steps if grid else None, "budget_s": budget_s, "budget_clock": clock, "seeds": opts.seeds, "lr_source": "config" if method is None else
                "given" if name in opts.lrs else "probe" if grid else "default"}
        results.append(_run_row(spec, out, i, len(rows), opts.rerun, log))
    summary = {"rows": results, "pf": pf, "cfg": cfg, "base": base, "opts": opts, "probe_steps": probe_steps,
               "load_start": load_start, "load_end": os.getloadavg(), "wall_s": time.time() - t0, "threads": threads,
               "clock": clock}
    from .report import write_compare

    write_compare(summary, out)
    log(f"wrote {out}/compare.md, {out}/compare.csv, {out}/compare.png")
    return summary


def _center(method: str | None) -> float:
    from .space import DEFAULT_LR, METHOD_LR

    return METHOD_LR.get(method or "lora", DEFAULT_LR)


def _lora_choice(pf, base: JobConfig) -> dict[str, Any]:
    """What `method: lora` alone chooses on this model and task (job.auto_method): DoRA's row uses it."""
    from ..train.job import auto_method

    ac, _ = auto_method(P.derive(base, {"method": "lora"}), pf.skeleton(), pf.task)
    keep = ("r", "lora_alpha", "target_modules", "layers_to_transform")
    return {k: getattr(ac, k) for k in keep if getattr(ac, k, None) is not None}


def _block(method: str | None, base: JobConfig, dora_like: dict[str, Any]) -> Any:
    if method is None or method == base.method_name():
        return base.method  # the config's own settings for its method (`lora` alone: the job's automatic choice)
    if method == "dora":
        return {"name": "dora", **dora_like}
    return {"name": method, **METHOD_DEFAULTS.get(method, {})}


def _label(name: str, block: Any, cfg: JobConfig) -> str:
    m = block if isinstance(block, str) else block.get("name", "lora")
    kw = {} if isinstance(block, str) else {k: v for k, v in block.items() if k != "name"}
    shown = ", ".join(f"{k}={v}" for k, v in kw.items() if k not in ("target_modules",))
    if isinstance(kw.get("target_modules"), (list, str)):
        t = kw["target_modules"]
        shown += (", " if shown else "") + f"targets {','.join(t) if isinstance(t, list) else t}"
    if name == "config":
        return f"config as given: {m}" + (f" ({shown})" if shown else " (auto)") + f", lr {cfg.train.lr:g}"
    return m + (f" ({shown})" if shown else "")


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel sends it SIGKILL when the compare process dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _run_row(spec: dict[str, Any], out: Path, i: int, n: int, rerun: bool, log) -> dict[str, Any]:
    run_dir = out / "runs" / spec["name"]
    res_path = run_dir / "result.json"
    key = json.loads(json.dumps(spec, default=str))
    if res_path.is_file() and not rerun:
        try:
            old = json.loads(res_path.read_text())
        except (OSError, ValueError):
            old = None
        if old and old.get("spec") == key and old.get("status") in ("ok", "error"):
            log(f"[{i}/{n}] {spec['label']}: kept from an earlier session ({res_path})")
            return old
    shutil.rmtree(run_dir, ignore_errors=True)  # a row runs whole again: its probe and run folders start empty
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(key, indent=2))
    res_path.unlink(missing_ok=True)
    log(f"[{i}/{n}] {spec['label']}: " + (f"lr probe {spec['grid']} ({spec['probe_steps']} steps each), then "
                                          if spec["grid"] else f"lr {spec['lr']:g} ({spec['lr_source']}), ")
        + "the run, then the test split ...")
    t0 = time.time()
    with open(run_dir / "worker.log", "w") as f:
        try:
            p = subprocess.run([sys.executable, "-m", "slimtune.search.worker", str(spec_path)], stdout=f,
                               stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                               env={**os.environ, TRACKERS_RUN_NAME: spec["name"]})  # the row's tracker run
        except KeyboardInterrupt:
            from ..train.interrupt import TrainingInterrupted

            raise TrainingInterrupted(f"compare interrupted during {spec['name']}: the finished rows are kept in {out}/runs; "
                                      "run the same command again to continue") from None
    try:
        res = json.loads(res_path.read_text())
    except (OSError, ValueError):
        res = {"spec": key, "name": spec["name"], "label": spec["label"], "status": "crashed",
               "error": f"the worker exited with code {p.returncode} without a result; see {run_dir}/worker.log"}
    res["worker_s"] = time.time() - t0
    log(f"[{i}/{n}] {spec['label']}: " + _line(res))
    return res


def _line(res: dict[str, Any]) -> str:
    if res.get("status") != "ok":
        return f"{res.get('status')}: {str(res.get('error'))[:200]}"
    r, t = res["run"], res.get("test") or {}
    m = r["metric"]
    return (f"lr {res['lr']:.3g} ({res['lr_source']}), {r['trainable_pct']:.3f}% trainable, validation {m} "
            f"{r['best']:.4f}, test {m} {t.get(m, float('nan')):.4f}, {r['train_time_s']:.0f} s training, "
            f"peak {r['peak_mem_mb']:.0f} MB")
