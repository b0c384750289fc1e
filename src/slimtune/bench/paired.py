"""Paired estimates of the LoRA overhead (slimtune or HF PEFT; training or unmerged inference) over
the frozen floor, with their uncertainty.

Why: on a shared 2-core VM one step swings by ±8% from the next, and two identical models set up
side by side differ by up to 5%, so the round-robin rows (a few steps per scenario) move by several
percent between runs. Here one model carries the adapter; steps alternate between the adapter
disabled (the frozen floor: the same weights at the same addresses, every LoRA layer calling its
base layer) and LoRA training, back to back, in A-B / B-A order. The overhead is the median of the
per-pair time ratios, with a bootstrap 95% interval over the pairs.

`--scenarios paired_infer` does the same for unmerged inference: no-grad forwards with the adapter
off (the base model) and on.

Both training sides compute gradients down to the input embeddings (the floor needs them to have a
backward at all), so the LoRA side does the first layer's input gradient too, which the `slimtune`
row skips: this estimate leans against slimtune, never for it.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import time

import torch

from .core import Row, _sync
from .presets import Preset
from .scenarios import _peft_cfg, _slim_cfg


def bootstrap_median_ci(values: list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
                        ) -> tuple[float, float]:
    """Percentile bootstrap interval of the median (resampling the values with replacement)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n_boot))
    lo = meds[int((1 - level) / 2 * n_boot)]
    hi = meds[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return lo, hi


def paired_rows(model, x, p: Preset, checks: dict, pairs: int, lib: str = "slimtune", train: bool = True
                ) -> list[Row]:
    """`pairs` timed (floor, LoRA) step pairs on one model injected by `lib` ("slimtune" or "peft":
    HF PEFT through the same estimator). train=True: training steps, rows in group "paired";
    train=False: no-grad forwards (unmerged inference against the base), group "paired_infer"."""
    if lib == "peft":
        import peft

        sm = peft.get_peft_model(model, _peft_cfg(p))
    else:
        import slimtune

        sm = slimtune.get_peft_model(model, _slim_cfg(p))
    base = sm.base_model.model
    was_training = base.training
    if train:
        base.enable_input_require_grads()
    else:
        sm.eval()
    params = [q for q in sm.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if train else None

    def step(lora: bool) -> float:
        # switching the adapter off and on walks every module: done outside the timed region
        with contextlib.nullcontext() if lora else sm.disable_adapter(), torch.set_grad_enabled(train):
            _sync(p.device)
            t0 = time.perf_counter()
            if train:
                sm(input_ids=x, labels=x).loss.backward()
                if lora:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            else:
                sm(input_ids=x)
            _sync(p.device)
            return (time.perf_counter() - t0) * 1000

    floor, lora = [], []
    try:
        for _ in range(p.warmup):
            step(False)
            step(True)
        for i in range(pairs):
            # alternate which side goes first: neither always runs on a warmer cache
            for side in ((False, True) if i % 2 == 0 else (True, False)):
                (lora if side else floor).append(step(side))
    finally:
        if train:
            base.disable_input_require_grads()
        sm.train(was_training)
        sm.unload()
    ratios = [b / a for a, b in zip(floor, lora)]
    med = statistics.median(ratios)
    lo, hi = bootstrap_median_ci(ratios)
    group = "paired" if train else "paired_infer"
    vs = "floor" if train else "base"
    checks.update({f"{group}_{lib}_vs_{vs}": round(med, 3), f"{group}_{lib}_ci95": [round(lo, 3), round(hi, 3)],
                   "paired_pairs": pairs})
    tokens = p.batch * p.seq
    note = f"median pair ratio {med:.3f}, 95% CI [{lo:.3f}, {hi:.3f}] over {pairs} pairs"
    floor_name = ("frozen" if train else "base") + ("" if lib == "slimtune" else f"_{lib}")
    return [Row(group, floor_name, statistics.median(floor), tokens / statistics.median(floor) * 1000, None,
                times_ms=floor),
            Row(group, lib, statistics.median(lora), tokens / statistics.median(lora) * 1000, None,
                sum(q.numel() for q in params), times_ms=lora, note=note)]
