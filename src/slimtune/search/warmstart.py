"""The search's first trial: the configuration `slimtune train` would run from the same YAML.

Why: TPE's first trials are random draws, so a search could spend its budget without ever trying the
hand-set (or the job's default) configuration, and then report a best that is worse than what the
user already had. Queueing that configuration first (`study.enqueue_trial`) makes the search's best
at least the job's own choice on the validation split, and gives the sampler a sensible point to
start from. Each value is snapped into the space (the nearest choice, a range's clip); a key the
config does not decide is left to the sampler.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from ..train.config import JobConfig
from .space import LORA_LIKE, Dist, Space, _label


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
