"""Before training: the schedule, and setups that would run but learn or measure nothing.

    plan(train_cfg, n_train, world)  -> Schedule (steps per epoch, total steps, warm-up)
    preflight(cfg, data, schedule, metric) -> warnings to print and report; raises JobConfigError
                                          for a schedule that cannot work

What is named (docs/data.md lists each with its message):
  - a warm-up that never ends: longer than the run, or longer than 100 passes over the data
    (`max_steps=1e12` warms up for 5e10 steps: the learning rate would stay ~0 in any run)
  - a validation split too small to tell checkpoints apart (the metric's resolution is given)
  - a validation split holding one class, and classes with no training example
  - truncation of most examples (with the lengths that would keep them)
A label column with fewer than 2 classes fails earlier, in data.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import JobConfig, JobConfigError, TrainConfig

WARMUP_MAX_EPOCHS = 100  # a warm-up longer than this many passes over the data is a mistake, not a plan
MIN_VAL_CLASSIFICATION = 30  # below this, accuracy moves in steps coarser than 0.033
MIN_VAL_LOSS = 10


@dataclass
class Schedule:
    micro_per_epoch: int  # micro-batches in one pass over the training examples (all processes)
    total_steps: int  # optimizer steps of the whole run
    warmup: int  # warm-up steps (linear from ~0 to train.lr)
    grad_accum: int = 1

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_per_epoch / self.grad_accum


def plan(t: TrainConfig, n_train: int, world: int = 1) -> Schedule:
    micro = math.ceil(n_train / (t.batch_size * world))
    total = t.max_steps or max(1, math.ceil(t.epochs * micro / t.grad_accum))
    warm = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
    return Schedule(micro, total, min(warm, total), t.grad_accum)


def _num(x: float) -> str:
    return f"{x:,.0f}" if x < 1e7 else f"{x:.2g}"


def check_schedule(t: TrainConfig, s: Schedule, n_train: int) -> None:
    """A warm-up the run would never finish is an error: the learning rate would stay near zero."""
    if t.warmup_steps is not None and t.warmup_steps >= s.total_steps and t.warmup_steps > 0:
        raise JobConfigError(
            f"train.warmup_steps={t.warmup_steps} is not shorter than the run ({s.total_steps} steps): the learning "
            f"rate would still be rising when training ends. Set train.warmup_steps below {s.total_steps} "
            f"(e.g. {max(1, s.total_steps // 10)}), or train longer")
    epochs_of_warmup = s.warmup / max(s.steps_per_epoch, 1e-9)
    if epochs_of_warmup > WARMUP_MAX_EPOCHS:
        how = (f"train.warmup_steps={t.warmup_steps}" if t.warmup_steps is not None else
               f"warmup_ratio {t.warmup_ratio} of {'train.max_steps=' + _num(s.total_steps) if t.max_steps else _num(s.total_steps) + ' steps'}")
        raise JobConfigError(
            f"the warm-up would never end: {how} is {_num(s.warmup)} steps, {_num(epochs_of_warmup)} passes over "
            f"your {n_train} training examples, so the learning rate would stay near 0 in any run you can afford. "
            f"Set train.warmup_steps (e.g. {max(1, min(100, round(s.steps_per_epoch)))}) and a train.max_steps you "
            "will reach (or train.epochs)")


def preflight(cfg: JobConfig, data: Any, s: Schedule, metric: str, task: str) -> list[str]:
    """Warnings about a setup that trains but cannot be measured or learned well."""
    check_schedule(cfg.train, s, len(data.train))
    warns: list[str] = []
    n_val = len(data.eval)
    if metric == "gen_accuracy":
        n_val = min(len(data.eval_raw), cfg.eval.max_examples)
    if metric in ("accuracy", "f1", "gen_accuracy", "choice_accuracy") and n_val < MIN_VAL_CLASSIFICATION:
        warns.append(f"validation has {n_val} example(s): {metric} moves in steps of {1 / max(n_val, 1):.3g}, too "
                     "coarse to tell checkpoints apart, so the best one is picked by chance; give data.validation or "
                     f"raise data.val_fraction / data.max_eval (100 examples resolve 0.01)")
    elif metric.endswith("loss") and n_val < MIN_VAL_LOSS:
        warns.append(f"validation has {n_val} example(s): {metric} on so few is noisy, and the best checkpoint "
                     "follows the noise; give data.validation or raise data.val_fraction")
    counts = data.stats.get("class_counts")
    if counts and data.labels:
        val = {k: v for k, v in counts["validation"].items() if v}
        if len(val) == 1 and len(data.labels) > 1:
            only = next(iter(val))
            warns.append(f"validation holds one class only ({only!r}): accuracy there measures how often the model "
                         f"answers {only!r}, not whether it tells the classes apart; give a validation split with "
                         "every class (data.validation)")
        missing = [lab for lab in data.labels if not counts["train"].get(lab)]
        if missing:
            warns.append(f"class(es) {missing} have no training example: the model cannot learn them")
    lengths = data.stats.get("lengths") or []
    cut = data.stats.get("truncated", 0)
    if lengths and cut > len(lengths) / 2:
        srt = sorted(lengths)
        med, p90 = srt[len(srt) // 2], srt[min(len(srt) - 1, int(0.9 * len(srt)))]
        warns.append(f"truncation cuts {cut} of {len(lengths)} examples ({100 * cut / len(lengths):.0f}%) to "
                     f"data.max_length={cfg.data.max_length} tokens (lengths: median {med}, 90th percentile {p90}, "
                     f"longest {srt[-1]}); most examples lose text: raise data.max_length (e.g. {p90})")
    return warns


def best_no_better(metric: str, maximize: bool, before: dict | None, best: float | None, best_step: int | None) -> str | None:
    """The report's warning when training did not beat the untrained model on the selection metric."""
    if not before or best is None or metric not in before:
        return None
    b = before[metric]
    if (best > b) if maximize else (best < b):
        return None
    return (f"the best checkpoint ({metric} {best:.4f} at step {best_step}) is no better than the model before "
            f"training ({b:.4f}): training did not improve the held-out {metric}. best/ holds it anyway; try another "
            "train.lr, more steps or more data, and check the data with a look at a few rows")
