"""One decode step of the server's mixed batch, in process (no HTTP, no scheduler): SmolLM2-135M
fp32, 16 rows with 60 cached tokens each, the bench's 16 LoRA adapters (r=16, all linear layers,
one distinct adapter per row, rows not in the stack's order), against the same 16 rows as base
rows. Also: the mixed step with `weights_dtype=torch.bfloat16` (serve --mixed-adapter-dtype
bfloat16; on a CPU without native bf16 it is emulated and slow) and the time this machine takes to
read 312 MB (the 16 adapters' fp32 bytes) with the same threads, to tell a bandwidth bound from
overheads. Scenarios interleave (A B C C B A ...); medians.

Run: flock /tmp/slimtune-bench.lock python benchmarks/serve_mixed_step.py [--threads 2] [--rounds 3]
"""
import argparse
import os
import random
import time

import torch
from transformers import DynamicCache

from slimtune.bench import serve as bench

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--steps", type=int, default=6, help="decode steps per scenario and round")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.set_grad_enabled(False)
pm, names = bench.preset_in_process("serve-mixed-step-")
tuner, hf = pm.base_model, pm.base_model.model
B, T = 16, 60
ids = torch.randint(0, 49000, (B, T), generator=torch.Generator().manual_seed(0))
mixed = names[:]
random.Random(0).shuffle(mixed)


def run(rows, **kw) -> float:
    """Prefill T tokens, then a.steps decode steps; the median decode step in seconds."""
    with tuner.mixed_batch(rows, **kw):
        cache = DynamicCache(config=hf.config)
        mask = torch.ones(B, T, dtype=torch.long)
        hf(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = ids[:, -1:]
        ts = []
        for _ in range(a.steps):
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            t0 = time.perf_counter()
            hf(input_ids=tok, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1, past_key_values=cache,
               use_cache=True, logits_to_keep=1)
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


scen = {"base rows": (["__base__"] * B, {}), "16 adapters mixed (fp32)": (mixed, {}),
        "16 adapters mixed (bf16 weights)": (mixed, {"weights_dtype": torch.bfloat16})}
got: dict[str, list[float]] = {k: [] for k in scen}
for rnd in range(a.rounds):
    for k in (list(scen) if rnd % 2 == 0 else list(scen)[::-1]):
        got[k].append(run(scen[k][0], **scen[k][1]))
big = torch.empty(312_000_000 // 4).normal_()
reads = []
for _ in range(7):
    t0 = time.perf_counter()
    big.sum()
    reads.append(time.perf_counter() - t0)
med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
print(f"SmolLM2-135M fp32, {B} rows x {T} cached tokens, {a.threads} threads, {a.rounds} rounds x {a.steps} steps")
for k, v in med.items():
    print(f"{k}: {v * 1e3:.1f} ms/step, step rate vs base rows {med['base rows'] / v:.3f}x")
print(f"reading 312 MB with torch.sum: {sorted(reads)[3] * 1e3:.1f} ms; "
      f"fp32 mixed - base: {(med['16 adapters mixed (fp32)'] - med['base rows']) * 1e3:.1f} ms")
print("load:", os.popen("uptime").read().strip())
