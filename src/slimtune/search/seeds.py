"""How sure the search's best is: the top configs trained again under other training seeds.

    the study's `top` best completed trials -> each trained again with train.seed + 1 .. + (seeds - 1)
    (the same validation and test examples: data.split_seed is pinned) -> mean and spread of each
    config's validation value over its seeds -> the pick: the best mean -> the pick's runs (one per
    seed) measured once each on the test split

Why: one trial's value is one draw of the training noise (head initialisation, data order, dropout);
on a 200-example validation split a config can win by two examples. Choosing by the mean over seeds,
and giving the spread next to it, says whether the winner's lead is more than that noise. The test
split still sees only the final pick (its seed runs, after the choice), never the choice itself.

The seed runs live in OUT/trials/trial-NNNN/seed-S; their values and test numbers are kept in the
study (user attrs `seeds`, `seed_tests`), so a resumed search does not train or measure them again.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

from ..train.config import JobConfig
from ..train.data import split_seed
from . import prepare as P


def seed_list(base: JobConfig, seeds: int) -> list[int]:
    """The training seeds of a config's runs: the study's own seed first (its trial), then the next ones."""
    return [base.train.seed + k for k in range(seeds)]


def pinned(base: JobConfig) -> JobConfig:
    """base with data.split_seed set to the seed its splits were carved with, so changing train.seed
    leaves the validation and test examples where they were (data.split_seed null follows train.seed)."""
    return P.derive(base, {"data": {"split_seed": split_seed(base.data, base.train.seed)}})


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def spread(study, top: list, seeds: int, trial_config: Callable[[Any], JobConfig], trial_folder: Callable[[int], Path],
           metric_max: bool, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], Any]:
    """Train each of `top` (completed trials, best first) under `seeds` training seeds (the trial itself
    is the first); rows of {trial, values {seed: value}, mean, std, min, max}, best mean first, and the
    picked trial (the best mean; ties: the better single trial, i.e. the earlier in `top`)."""
    kept: dict[str, dict[str, float]] = {k: dict(v) for k, v in (study.user_attrs.get("seeds") or {}).items()}
    rows = []
    for rank, t in enumerate(top):
        cfg = pinned(trial_config(t))
        ss = seed_list(cfg, seeds)
        runs = kept.setdefault(str(t.number), {})
        runs[str(ss[0])] = float(t.values[0])
        for sd in ss[1:]:
            if str(sd) in runs:
                continue
            folder = trial_folder(t.number) / f"seed-{sd}"
            rc = P.derive(cfg, {"train": {"seed": sd}, "output_dir": str(folder)})
            res = P.run_once(rc)
            if res["best"] is None:
                raise RuntimeError(f"trial {t.number}'s config under train.seed {sd} made no evaluation")
            runs[str(sd)] = float(res["best"])
            P.strip_checkpoints(folder)
            study.set_user_attr("seeds", kept)
            log(f"seed spread: trial {t.number} under train.seed {sd}: {res['metric']} {res['best']:.4f}")
        vals = [runs[str(sd)] for sd in ss]
        rows.append({"trial": t.number, "rank": rank, "values": {sd: runs[str(sd)] for sd in ss}, **stats(vals)})
    rows.sort(key=lambda r: ((-r["mean"] if metric_max else r["mean"]), r["rank"]))
    pick = next(t for t in top if t.number == rows[0]["trial"])
    return rows, pick


def measure_pick(study, pick, seeds: int, trial_config: Callable[[Any], JobConfig],
                 trial_folder: Callable[[int], Path]) -> dict[str, dict[str, float]]:
    """The picked config's run under each seed on the test split, once each (kept in the study)."""
    done: dict[str, dict[str, dict[str, float]]] = dict(study.user_attrs.get("seed_tests") or {})
    mine = done.setdefault(str(pick.number), {})
    cfg = pinned(trial_config(pick))
    for k, sd in enumerate(seed_list(cfg, seeds)):
        if str(sd) in mine:
            continue
        folder = trial_folder(pick.number) if k == 0 else trial_folder(pick.number) / f"seed-{sd}"
        rc = P.derive(cfg, {"train": {"seed": sd}, "output_dir": str(folder)})
        mine[str(sd)] = P.measure_test(rc, folder)
        study.set_user_attr("seed_tests", done)
    return mine
