"""One row of `slimtune compare`, in its own process: `python -m slimtune.search.worker SPEC.json`.

    the lr probe (when the spec has a grid) -> the run -> the run's best adapter on the test split
    -> RUN_DIR/result.json (written whole or not at all)

The probe's runs are the row's config with `probe_steps` steps, one evaluation at the end and no
checkpoints kept (RUN_DIR/probe/lr-*); the main run is RUN_DIR/main. With a training-time budget the
main run's steps are the budget over the step time the probe measured (its median), so every method
trains for about the same time and its schedule still ends where it should.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
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


def _score(res: dict[str, Any] | None, metric_max: bool) -> tuple:
    """Sort key, higher is better: the probe's validation metric, then its validation loss."""
    if res is None or res.get("best") is None:
        return (-math.inf, -math.inf)
    v = float(res["best"])
    loss = ((res.get("after") or {}).get("eval_loss"))
    return (v if metric_max else -v, -(loss if loss is not None else math.inf))


def _separated(tried: dict[float, dict[str, Any]], metric_max: bool) -> bool:
    """Whether the probe's winner is ahead of the runner-up on the metric itself (not only on loss)."""
    ok = sorted((x for x in tried if tried[x]["res"] is not None), key=lambda x: _score(tried[x]["res"], metric_max),
                reverse=True)
    return len(ok) < 2 or _score(tried[ok[0]]["res"], metric_max)[0] != _score(tried[ok[1]]["res"], metric_max)[0]


def probe(cfg: JobConfig, grid: list[float], steps: int, run_dir: Path, log) -> tuple[float, list[dict[str, Any]]]:
    """The lr whose short run scores best on validation, and a row per probe run. When the winner is
    not ahead on the metric, successive halving: the better half again at twice the steps (at most
    MAX_HALVINGS rounds, never past the row's own steps); a tie left after that is chosen by
    validation loss and marked `undecided` on every row of the last round."""
    from ..train.trainer import TrainingDiverged

    metric_max = not (cfg.train.metric.endswith("loss") or cfg.train.metric == "perplexity")
    tried: dict[float, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []

    def one(lr: float, n: int = steps) -> None:
        c = P.derive(cfg, {"train": {"lr": lr, "max_steps": n, "eval_every": n, "eval_before": False,
                                     "save_every": 10**6, "early_stopping_patience": None,
                                     "report_to": "none"},  # a probe is not a row: no tracker run of its own
                           "eval": {"samples": 0}, "output_dir": str(run_dir / "probe" / (
                               f"lr-{lr:.3g}" if n == steps else f"lr-{lr:.3g}-{n}steps"))})
        try:
            res = P.run_once(c, log=log)
            tried[lr] = {"lr": lr, "status": "ok", "value": res["best"], "eval_loss": (res["after"] or {}).get("eval_loss"),
                         "step_time_s": res["step_time_s"], "steps": n, "res": res}
        except TrainingDiverged as e:
            tried[lr] = {"lr": lr, "status": "diverged", "value": None, "error": str(e)[:200], "steps": n, "res": None}
        history.append(tried[lr])
        shutil.rmtree(Path(c.output_dir) / "checkpoints", ignore_errors=True)
        log(f"probe lr {lr:.3g}: " + (f"{cfg.train.metric} {tried[lr]['value']:.4f}" if tried[lr]["value"] is not None
                                      else tried[lr]["status"]))

    for lr in grid:
        one(lr)
    ratio = grid[1] / grid[0]
    for _ in range(MAX_EXTEND):
        best = max(tried, key=lambda x: _score(tried[x]["res"], metric_max))
        lo, hi = min(tried), max(tried)
        if tried[best]["res"] is None or best not in (lo, hi):
            break
        one(float(f"{(best * ratio if best == hi else best / ratio):.3g}"))
    n = steps
    row_steps = cfg.train.max_steps or 0
    for _ in range(MAX_HALVINGS):
        if _separated(tried, metric_max) or 2 * n > row_steps:
            break
        ok = sorted((x for x in tried if tried[x]["res"] is not None), key=lambda x: _score(tried[x]["res"], metric_max),
                    reverse=True)
        n *= 2
        keep = ok[:max(2, math.ceil(len(ok) / 2))]
        log(f"probe: no rate ahead on {cfg.train.metric} after {n // 2} steps; {len(keep)} again at {n} steps")
        tried = {lr: tried[lr] for lr in keep}
        for lr in keep:
            one(lr, n)
    best = max(tried, key=lambda x: _score(tried[x]["res"], metric_max))
    undecided = not _separated(tried, metric_max)
    if undecided:
        log(f"probe: could not separate the rates on {cfg.train.metric} after {n} steps; chose {best:g} by validation loss")
    last = {id(v) for v in tried.values()}
    rows = [{**{k: v for k, v in h.items() if k != "res"}, **({"undecided": True} if undecided and id(h) in last else {})}
            for h in sorted(history, key=lambda h: (h["steps"], h["lr"]))]
    if tried[best]["res"] is None:
        raise RuntimeError(f"every probe learning rate diverged ({', '.join(f'{x:g}' for x in sorted(tried))})")
    return best, rows


def run(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = JobConfig.model_validate(spec["config"])
    run_dir = Path(cfg.output_dir)
    log = print
    out: dict[str, Any] = {"spec": spec, "name": spec["name"], "label": spec["label"], "lr_source": spec["lr_source"]}
    lr = spec["lr"]
    if spec["grid"]:
        lr, out["probe"] = probe(cfg, spec["grid"], spec["probe_steps"], run_dir, log)
    out["lr"] = lr
    upd: dict[str, Any] = {"train": {"lr": lr}, "output_dir": str(run_dir / "main")}
    if spec.get("budget_s"):
        times = [p["step_time_s"] for p in out.get("probe", []) if p.get("step_time_s")]
        if not times:
            t = P.time_run(P.derive(cfg, {"train": {"lr": lr}}), run_dir / "timing")
            times = [t.step_s]
        step_s = statistics.median(times)
        steps = max(1, int(spec["budget_s"] // step_s))
        out["budget_steps"], out["budget_step_s"] = steps, step_s
        upd["train"]["max_steps"] = steps
        if cfg.train.eval_every and cfg.train.eval_every > steps:
            upd["train"]["eval_every"] = steps
        log(f"budget {spec['budget_s']:.0f} s at {step_s:.2f} s/step: {steps} steps")
    main = P.derive(cfg, upd)
    out["run"] = P.run_once(main, log=log)
    P.strip_checkpoints(Path(main.output_dir))
    out["test"] = P.measure_test(main, Path(main.output_dir))
    out["status"] = "ok"
    return out


def main(argv: list[str]) -> int:
    from .study import TRIAL_ERRORS

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
