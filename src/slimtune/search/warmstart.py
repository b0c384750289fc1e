"""The search's first trials: the configuration `slimtune train` would run from the same YAML, then
LoRA on every linear layer at the largest rank the trainable limit allows.

Why: TPE's first trials are random draws, so a search could spend its budget without ever trying the
hand-set (or the job's default) configuration, and then report a best that is worse than what the
user already had. Queueing that configuration first (`study.enqueue_trial`) makes the search's best
at least the job's own choice on the validation split, and gives the sampler a sensible point to
start from. Each value is snapped into the space (the nearest choice, a range's clip); a key the
config does not decide is left to the sampler. Above `max_trainable_pct` the job's choice would be
skipped unseen (the 1% limit and SmolLM2's r 16 on q/k/v/o: 1.35%), so its rank is lowered through
the space's ranks until it fits (`fit_under`).

The second start is QLoRA's finding (Dettmers et al. 2023, section 4): LoRA on every linear layer of
every block is what matches full fine-tuning, and the rank matters less than covering the linears.
So the search tries that early, at the largest rank under the limit, with the rank pattern off and
the lr at the centre of the space's range (the first start already tries the config's own lr, so
TPE sees two rates before its model of lr starts). This repo's SmolLM2 probes (benchmarks/results/
search/README.md) are the same lesson: every linear reached full fine-tuning's loss, attention did not.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from ..train.config import JobConfig
from . import prepare as P
from .space import BOTH_ROLES, LORA_LIKE, Dist, Space, _label, method_block

# a start's trainable share, from its configuration (`counter`: on a weightless model); None:
# the method chooses what trains from data, it cannot be counted before the run
Counter = Callable[[dict[str, Any]], Optional[float]]


def _nearest(d: Dist, v: Any) -> Any:
    """v snapped into d (None: d has nothing near v, e.g. a target set not offered)."""
    if d.kind == "fixed" or v is None:
        return None
    if d.kind in ("float", "int"):
        x = min(max(float(v), d.low), d.high)
        return int(round(x)) if d.kind == "int" else x
    if v in d.values:
        return _label(v)
    nums = [x for x in d.values if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if isinstance(v, (int, float)) and nums:
        far = (lambda x: abs(math.log(x / v))) if v > 0 and all(x > 0 for x in nums) else (lambda x: abs(x - v))
        return _label(min(nums, key=far))
    return None


def job_defaults(cfg: JobConfig, task: str) -> dict[str, Any]:
    """The method, rank, scale, targets, layers, dropout and lr `slimtune train` picks for this config
    on a small model (train/job.py: auto_method): the given keys, else r 8 (classification) / 16
    (generation), alpha 2r, the attention projections, every block, no dropout, no rsLoRA."""
    m = cfg.method_name()
    kw = cfg.method_kwargs()
    r = kw.get("r", 16 if task == "causal_lm" else 8)
    return {"method": m, "r": r, "alpha_over_r": float(kw.get("lora_alpha", 2 * r)) / r,
            "targets": "attention" if "target_modules" not in kw else None,
            "layers": "all" if "layers_to_transform" not in kw else None,
            "dropout": float(kw.get("lora_dropout", 0.0)), "rslora": bool(kw.get("use_rslora", False)),
            "lr": cfg.train.lr}


def first_trial(space: Space, cfg: JobConfig, task: str) -> Optional[dict[str, Any]]:
    """The study parameters (by their names in the study) of the job's own configuration, or None when
    its method is not in the space."""
    want = job_defaults(cfg, task)
    m = want["method"]
    if m not in space.methods:
        return None
    params: dict[str, Any] = {} if len(space.methods) == 1 else {"method": m}
    for key, d in space.per_method[m].items():
        if key != "lr" and m not in LORA_LIKE:
            continue
        v = _nearest(d, want.get(key))
        if v is not None:
            params[space.names[(m, key)]] = v
    return params


# keys that change what trains, not how much: a start that leaves them to the sampler can still be counted
NOT_COUNTED = ("alpha_over_r", "dropout", "rslora", "lr")


def draw_of(space: Space, params: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Study parameters (by their names in the study) -> the configuration `Space.sample` gives for them
    (through Optuna's FixedTrial), or None while a key that sets the trainable count is left to the
    sampler (the start cannot be counted before it runs); the keys that do not (NOT_COUNTED) take any
    value of their range then."""
    import optuna

    m = params.get("method", space.methods[0])
    filled = dict(params)
    for key in NOT_COUNTED:
        d, name = space.per_method[m].get(key), space.names.get((m, key))
        if d is not None and d.kind != "fixed" and name not in filled:
            filled[name] = _label(d.values[0]) if d.kind == "choice" else d.low
    try:
        return space.sample(optuna.trial.FixedTrial(filled))
    except ValueError:  # FixedTrial: a parameter the start leaves to the sampler
        return None


def fit_under(space: Space, params: dict[str, Any], limit: Optional[float], count: Counter) -> Optional[dict[str, Any]]:
    """params with its rank lowered through the space's ranks until its trainable share is <= limit;
    None when even the smallest rank is above it. Unchanged without a limit, without a rank to lower,
    or when it cannot be counted before it runs (the trial's own check then decides)."""
    m = params.get("method", space.methods[0])
    d = space.per_method[m].get("r")
    if limit is None or d is None or d.kind != "choice":
        return params
    name = space.names[(m, "r")]
    ranks = sorted((x for x in d.values if x <= params.get(name, max(d.values))), reverse=True)
    for r in ranks:
        p = {**params, name: r}
        draw = draw_of(space, p)
        if draw is None:  # a key the sampler decides: the trial's own check will count it
            return params
        pct = count(draw)
        if pct is None or pct <= limit:
            return p
    return None


def all_linear_start(space: Space, first: Optional[dict[str, Any]], limit: Optional[float],
                     count: Counter) -> Optional[dict[str, Any]]:
    """The second start: LoRA (or the space's first LoRA-like method) on every linear of every block, the
    largest rank under the limit, the job's scale / dropout / rsLoRA (`first`, before any lowering), no
    rank pattern, the lr at the centre of the space's range. None when the space offers no such point
    or no rank of it fits."""
    m = next((x for x in space.methods if x in LORA_LIKE), None)
    if m is None:
        return None
    dists = space.per_method[m]
    want = {"targets": BOTH_ROLES, "layers": "all", "mlp_r_factor": 1.0}
    if any(dists.get(key) is None or v not in dists[key].values for key, v in want.items()):
        return None
    params: dict[str, Any] = {} if len(space.methods) == 1 else {"method": m}
    same = (first or {}) if (first or {}).get("method", space.methods[0]) == m else {}
    for key, d in dists.items():
        name = space.names[(m, key)]
        if d.kind == "fixed":
            continue
        if key in want:
            params[name] = _label(want[key])
        elif key == "r":
            params[name] = max(d.values) if d.kind == "choice" else int(d.high)
        elif key == "lr":
            params[name] = math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2
        elif name in same:
            params[name] = same[name]
    return fit_under(space, params, limit, count)


def starts(space: Space, cfg: JobConfig, task: str, limit: Optional[float], count: Counter) -> list[tuple[dict[str, Any], str]]:
    """The trials queued before the sampler draws: (study parameters, why) for the job's own choice
    (its rank lowered under the limit if need be) and the every-linear start, each when the space has it."""
    out: list[tuple[dict[str, Any], str]] = []
    first = first_trial(space, cfg, task)
    fitted = fit_under(space, first, limit, count) if first is not None else None
    if fitted is not None:
        m = fitted.get("method", space.methods[0])
        lowered = fitted != first and space.names.get((m, "r")) in fitted
        out.append((fitted, "the configuration slimtune train would run" +
                    (f", its rank lowered to {fitted[space.names[(m, 'r')]]} to fit max_trainable_pct {limit:g}"
                     if lowered else "")))
    second = all_linear_start(space, first, limit, count)
    if second is not None and second == fitted:
        second = None
    if second is not None:
        out.append((second, "LoRA on every linear of every block at the largest rank under the limit (QLoRA's "
                            "recipe), the lr at the centre of the space's range"))
    return out


# ---- queueing the starts on a study (study.py) ----
def counter(pf, base: JobConfig) -> Counter:
    """A configuration's trainable share in %, counted on a weightless model (prepare.count_trainable)."""
    def count(params: dict[str, Any]) -> float | None:
        block = method_block(params, pf.blocks, pf.total_steps)
        counts = P.count_trainable(pf, P.derive(base, {"method": block, "train": {"lr": float(params["lr"])}}))
        return None if counts is None else counts[2]
    return count


def queue(study, params: dict[str, Any], why: str, log) -> None:
    # skip_if_exists: two machines creating the study (or queueing the next start) at once queue it once
    study.enqueue_trial(params, user_attrs={"warm_start": why}, skip_if_exists=True)
    log(f"warm start: {why} ({', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())})")


def queue_next(study, log) -> None:
    """Queue the next of the study's later warm starts (`starts`) when no trial is waiting."""
    from optuna.trial import TrialState

    later = study.user_attrs.get("later_starts") or []
    if later and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.set_user_attr("later_starts", later[1:])
        queue(study, *later[0], log)
