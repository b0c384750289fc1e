"""One row of `slimtune compare`, in its own process: `python -m slimtune.search.worker SPEC.json`.

    the lr probe (when the spec has a grid) -> the run -> the run's best adapter on the test split
    -> RUN_DIR/result.json (written whole or not at all)

Each probe is the row's own run at one lr (RUN_DIR/probe/lr-*: the row's config, schedule and
evaluations), stopped at the evaluation that reaches `probe_steps` with its checkpoint kept; a rate
promoted by successive halving continues from that checkpoint, and the winner's folder becomes
RUN_DIR/main, where the row's run continues it to the end: no probe step is trained twice, and the
row's steps (and training time) include the winner's probe steps. With a training-time budget the
steps are fixed first (the budget over the steady step time of a 3-step timing run of the row, its first step left out), so the probes
already run the schedule the row ends on.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from ..train.config import JobConfig
from . import prepare as P

MAX_EXTEND = 2  # grid points added past an edge that keeps winning
# successive-halving rounds when the probe's winner is not ahead on the metric (a tie: short probes
# often leave every rate at the majority class); each round keeps the better half at twice the steps
MAX_HALVINGS = 2


def _score(res: dict[str, Any] | None, metric: str, metric_max: bool) -> tuple:
    """Sort key, higher is better: the probe's validation metric at its last evaluation (the rung it
    reached), then its validation loss there."""
    last = (res or {}).get("after") or {}
    if res is None or last.get(metric) is None:
        return (-math.inf, -math.inf)
    v = float(last[metric])
    loss = last.get("eval_loss")
    return (v if metric_max else -v, -(loss if loss is not None else math.inf))


def _separated(tried: dict[float, dict[str, Any]], metric: str, metric_max: bool) -> bool:
    """Whether the probe's winner is ahead of the runner-up on the metric itself (not only on loss)."""
    ok = sorted((x for x in tried if tried[x]["res"] is not None), key=lambda x: _score(tried[x]["res"], metric, metric_max),
                reverse=True)
    return len(ok) < 2 or (_score(tried[ok[0]]["res"], metric, metric_max)[0]
                           != _score(tried[ok[1]]["res"], metric, metric_max)[0])


def probe_folder(run_dir: Path, lr: float) -> Path:
    return run_dir / "probe" / f"lr-{lr:.3g}"


def probe(cfg: JobConfig, grid: list[float], steps: int, run_dir: Path, log) -> tuple[float, list[dict[str, Any]]]:
    """The lr whose short run scores best on validation, and a row per probe rung.

    Each probe is the row's own run (its config, schedule and evaluations; only the lr differs),
    stopped at the first evaluation at or past `steps` with its checkpoint kept. When the winner is
    not ahead on the metric, successive halving: the better half is *continued* from its checkpoint to
    twice the steps (at most MAX_HALVINGS rounds, never past the row's own steps), not trained again
    from step 0; a tie left after that is chosen by validation loss and marked `undecided` on every
    row of the last round. The winner's folder (probe_folder) is where the row's run continues."""
    from ..train.trainer import TrainingDiverged

    metric = cfg.train.metric
    metric_max = not (metric.endswith("loss") or metric == "perplexity")
    total = cfg.train.max_steps or 0
    tried: dict[float, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []

    def one(lr: float, n: int = steps) -> None:
        again = lr in tried  # a promoted rate: its run continues from the checkpoint at the rung it reached
        c = P.derive(cfg, {"train": {"lr": lr, "report_to": "none"},  # a probe is not a row: no tracker run
                           "output_dir": str(probe_folder(run_dir, lr)),
                           "resume": again, "overwrite": not again})

        def rung(step: int, _metrics: dict) -> str | None:
            return f"probe rung: {step} steps (lr {lr:.3g})" if step >= n and step < total else None

        try:
            res = P.run_once(c, on_evaluate=rung, log=log)
            last = res["after"] or {}
            tried[lr] = {"lr": lr, "status": "ok", "value": last.get(metric), "eval_loss": last.get("eval_loss"),
                         "step_time_s": res["step_time_s"], "steps": res["steps"], "trained": res["session_steps"],
                         "res": res}
        except TrainingDiverged as e:
            tried[lr] = {"lr": lr, "status": "diverged", "value": None, "error": str(e)[:200], "steps": n,
                         "trained": None, "res": None}
        history.append(tried[lr])
        log(f"probe lr {lr:.3g}: " + (f"{metric} {tried[lr]['value']:.4f} at step {tried[lr]['steps']}"
                                      + (f" ({tried[lr]['trained']} more steps from its checkpoint)" if again else "")
                                      if tried[lr]["value"] is not None else tried[lr]["status"]))

    for lr in grid:
        one(lr)
    ratio = grid[1] / grid[0]
    for _ in range(MAX_EXTEND):
        best = max(tried, key=lambda x: _score(tried[x]["res"], metric, metric_max))
        lo, hi = min(tried), max(tried)
        if tried[best]["res"] is None or best not in (lo, hi):
            break
        one(float(f"{(best * ratio if best == hi else best / ratio):.3g}"))
    n = steps
    for _ in range(MAX_HALVINGS):
        if _separated(tried, metric, metric_max) or 2 * n > total:
            break
        ok = sorted((x for x in tried if tried[x]["res"] is not None),
                    key=lambda x: _score(tried[x]["res"], metric, metric_max), reverse=True)
        n *= 2
        keep = ok[:max(2, math.ceil(len(ok) / 2))]
        log(f"probe: no rate ahead on {metric} after {n // 2} steps; {len(keep)} continued to {n} steps")
        tried = {lr: tried[lr] for lr in keep}
        for lr in keep:
            one(lr, n)
    best = max(tried, key=lambda x: _score(tried[x]["res"], metric, metric_max))
    undecided = not _separated(tried, metric, metric_max)
    if undecided:
        log(f"probe: could not separate the rates on {metric} after {n} steps; chose {best:g} by validation loss")
    last = {id(v) for v in tried.values()}
    rows = [{**{k: v for k, v in h.items() if k != "res"}, **({"undecided": True} if undecided and id(h) in last else {}),
             **({"continued": True} if h is tried[best] else {})}
            for h in sorted(history, key=lambda h: (h["steps"], h["lr"]))]
    if tried[best]["res"] is None:
        raise RuntimeError(f"every probe learning rate diverged ({', '.join(f'{x:g}' for x in sorted(tried))})")
    for lr in {h["lr"] for h in history} - {best}:  # the losers' checkpoints are no longer needed
        P.strip_checkpoints(probe_folder(run_dir, lr))
    return best, rows


def run(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = JobConfig.model_validate(spec["config"])
    run_dir = Path(cfg.output_dir)
    log = print
    out: dict[str, Any] = {"spec": spec, "name": spec["name"], "label": spec["label"], "lr_source": spec["lr_source"]}
    lr = spec["lr"]
    if spec.get("budget_s"):  # the steps first: every probe is the row's own schedule, so it can be continued
        t = P.time_run(P.derive(cfg, {"train": {"lr": lr or spec["grid"][len(spec["grid"]) // 2]}}),
                       run_dir / "timing")
        clock = spec.get("budget_clock") or "wall"
        step_s = t.budget_step_s(clock)
        steps = max(1, int(spec["budget_s"] // step_s))
        out["budget_steps"], out["budget_step_s"], out["budget_clock"] = steps, step_s, clock
        out["budget_wall_step_s"] = t.step_s
        # the timing run's steps are where the row starts; it re-plans them on its own steady steps
        upd: dict[str, Any] = {"max_steps": steps, "budget_s": spec["budget_s"], "budget_clock": clock}
        if cfg.train.eval_every and cfg.train.eval_every > steps:
            upd["eval_every"] = steps
        cfg = P.derive(cfg, {"train": upd})
        if isinstance(cfg.method, dict) and "total_step" in cfg.method:  # AdaLoRA: its schedule spans the row
            cfg = P.derive(cfg, {"method": {**cfg.method, "total_step": steps}})
        log(f"budget {spec['budget_s']:.0f} s on the {clock} clock at {step_s:.2f} s/step ({t.step_s:.2f} s/step "
            f"wall): {steps} steps to start with, re-planned on the row's own steady steps")
    main_dir = run_dir / "main"
    resume = False
    if spec["grid"]:
        lr, out["probe"] = probe(cfg, spec["grid"], spec["probe_steps"], run_dir, log)
        shutil.rmtree(main_dir, ignore_errors=True)
        probe_folder(run_dir, lr).rename(main_dir)  # the winner's run is the row's start: continued, not redone
        resume = True
        log(f"the row's run continues the winning probe (lr {lr:.3g}) from its checkpoint")
    out["lr"] = lr
    main = P.derive(cfg, {"train": {"lr": lr}, "output_dir": str(main_dir), "resume": resume, "overwrite": not resume})
    out["run"] = P.run_once(main, log=log)
    P.strip_checkpoints(Path(main.output_dir))
    out["test"] = P.measure_test(main, Path(main.output_dir))
    if (spec.get("seeds") or 1) > 1:
        out["seed_runs"] = seed_runs(main, out, spec["seeds"], run_dir, log)
    out["status"] = "ok"
    return out


def seed_runs(main: JobConfig, out: dict[str, Any], n: int, run_dir: Path, log) -> list[dict[str, Any]]:
    """The row's chosen config (its lr and steps) trained again from step 0 under train.seed + 1 ..
    + (n - 1), on the same splits (data.split_seed pinned), each measured once on the test split: the
    spread says how much of a row's lead is training noise. The row's own run is the first seed."""
    from .seeds import pinned

    cfg = pinned(P.derive(main, {"resume": False, "overwrite": True}))
    rows = [{"seed": main.train.seed, "val": out["run"]["best"], "test": out["test"]}]
    for k in range(1, n):
        sd = main.train.seed + k
        folder = run_dir / f"seed-{sd}"
        c = P.derive(cfg, {"train": {"seed": sd}, "output_dir": str(folder)})
        res = P.run_once(c, log=log)
        P.strip_checkpoints(folder)
        rows.append({"seed": sd, "val": res["best"], "test": P.measure_test(c, folder)})
        log(f"seed {sd}: validation {res['best']}, test {rows[-1]['test'].get(main.train.metric)}")
    return rows


def main(argv: list[str]) -> int:
    from .trial import TRIAL_ERRORS

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    res_path = spec_path.with_name("result.json")
    try:
        res = run(spec)
    except TRIAL_ERRORS as e:  # this method cannot run on this model / data: a row with its message
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        res = {"spec": spec, "name": spec["name"], "label": spec["label"], "status": "error", "error": msg}
        print(f"error: {msg}")
    except Exception as e:  # noqa: BLE001 - diverged, or a bug: the traceback in worker.log, the row says so
        from ..train.trainer import TrainingDiverged

        traceback.print_exc()
        res = {"spec": spec, "name": spec["name"], "label": spec["label"],
               "status": "diverged" if isinstance(e, TrainingDiverged) else "failed", "error": str(e)[:500]}
    tmp = res_path.with_name(".result.json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str))
    tmp.replace(res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
