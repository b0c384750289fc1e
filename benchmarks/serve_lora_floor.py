"""How far 16 mixed LoRA adapters can get from the base model's decode step on this machine, and why.

SmolLM2-135M fp32, 16 rows, the bench's 16 adapters (r=16, all 7 linears of each of the 30
blocks: 210 LoRA layers), rows in the stack's slot order as the server keeps them (each layer reads
its stack of adapters in place, `lora_mixed._row_plan` "view"). Measured, interleaved, in one process:

  step       one decode step, base rows against the 16 adapters, alternating step by step (the same
             cache length each time); min and first quartile, so steps another job preempted do not
             decide the figure on a shared machine. Also every row on one adapter ("1 adapter x16":
             ~20 MB of adapter weights a step instead of 313 MB): what the LoRA ops cost beyond bytes
  lora       the LoRA part of such a step alone: the two bmm per layer over the layers' real stacks
             (the same calls `MixedLinear._mixed_forward` makes)
  fused-A    the same with one bmm for the A's of q/k/v and one for gate/up (they read the same x):
             the GEMM count per block 14 -> 11, bytes unchanged
  kernel     the same LoRA part through the lora_rows decode kernel (kernels/lora_rows.py), fp32
             stacks; kernel-bf16: bf16 stacks (the server's --mixed-adapter-dtype bfloat16)
  read       reading the adapters' bytes (every layer's stack, 312 MB) with torch.sum: the memory
             floor of any kernel that reads each weight once per step

The ratio base/mixed of the step cannot pass base / (base + read) with fp32 adapters: that is the
bound, and `lora` - `read` is what the GEMM kernels lose over it. With --kernel on the step rows run
the decode kernel (the server's default, --lora-kernel auto), and "16 adapters bf16" is the step
with bf16 stacks.

Run: flock /tmp/slimtune-bench.lock python benchmarks/serve_lora_floor.py [--threads 2] [--steps 16] [--kernel off]
"""
import argparse
import os
import time

import torch
from transformers import DynamicCache

from slimtune.bench import serve as bench
from slimtune.methods.lora_mixed import MixedLinear

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--steps", type=int, default=16, help="timed steps per scenario")
ap.add_argument("--cached", type=int, default=64, help="cached tokens per row")
ap.add_argument("--kernel", default="on", choices=["on", "off"], help="the step rows through the lora_rows kernel")
a = ap.parse_args()
from slimtune.kernels import lora_rows  # noqa: E402

print(lora_rows.enable(a.kernel))
torch.set_num_threads(a.threads)
torch.set_grad_enabled(False)
pm, names = bench.preset_in_process("serve-lora-floor-")
tuner, hf = pm.base_model, pm.base_model.model
B, T = 16, a.cached
ids = torch.randint(0, 49000, (B, T), generator=torch.Generator().manual_seed(0))
one = ids[:, :1]
mask = torch.ones(B, T + 1, dtype=torch.long)
pos = mask.sum(1, keepdim=True) - 1


def prefill(rows):
    with tuner.mixed_batch(rows):
        cache = DynamicCache(config=hf.config)
        hf(input_ids=ids, attention_mask=mask[:, :T], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def step(rows, cache, dtype=None) -> float:
    """One decode step of a batch already entered (as the server's decode steps are: a new batch's
    plans, `serve_mixed_entry.py`, are paid by an untimed step first); the cache is cut back to T
    columns after each step, so every step sees T."""
    with tuner.mixed_batch(rows, weights_dtype=dtype):
        for timed in (False, True):
            t0 = time.perf_counter()
            hf(input_ids=one, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
               logits_to_keep=1)
            dt = time.perf_counter() - t0
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :T], layer.values[:, :, :T]
    return dt


rows = {"base rows": ["__base__"] * B, "16 adapters": names, "16 adapters bf16": names, "1 adapter x16": [names[0]] * B}
dtypes = {"16 adapters bf16": torch.bfloat16}
caches = {k: prefill(r) for k, r in rows.items()}
for k in rows:
    step(rows[k], caches[k], dtypes.get(k))  # each layer's plan for the batch, worked out before the timing

# the layers' real stacks, in model order (7 per block: q, k, v, o, gate, up, down)
layers = [m for m in hf.modules() if isinstance(m, MixedLinear)]
stacks = [m._all_stacks(torch.float32) for m in layers]
A = [s[1][1:] for s in stacks]  # (16, in, r): the "view" plan's slice
Bw = [s[2][1:] for s in stacks]  # (16, r, out)
X = {n: torch.randn(B, 1, n) for n in {m.in_features for m in layers}}
O = [torch.zeros(B, 1, m.out_features) for m in layers]
nbytes = sum(x.numel() * 4 for x in A + Bw)
blocks = [layers[i:i + 7] for i in range(0, len(layers), 7)]
assert all([m.out_features for m in blk][:3] == [576, 192, 192] for blk in blocks), "not SmolLM2's q/k/v/o/gate/up/down"
fused_a = []
for i in range(0, len(layers), 7):
    fused_a.append((torch.cat(A[i:i + 3], dim=2).contiguous(), A[i + 3], torch.cat(A[i + 4:i + 6], dim=2).contiguous(),
                    A[i + 6]))


def lora() -> None:
    for m, a_u, b_u, o in zip(layers, A, Bw, O):
        o.baddbmm_(torch.bmm(X[m.in_features], a_u), b_u)


def lora_fused_a() -> None:
    for bi, (qkv, ao, gu, ad) in enumerate(fused_a):
        i = bi * 7
        xq, xd = X[layers[i].in_features], X[layers[i + 6].in_features]
        xa = torch.bmm(xq, qkv)  # (16, 1, 3r)
        r = xa.shape[-1] // 3
        for j in range(3):
            O[i + j].baddbmm_(xa[..., j * r:(j + 1) * r], Bw[i + j])
        O[i + 3].baddbmm_(torch.bmm(xq, ao), Bw[i + 3])
        xa = torch.bmm(xq, gu)
        O[i + 4].baddbmm_(xa[..., :r], Bw[i + 4])
        O[i + 5].baddbmm_(xa[..., r:], Bw[i + 5])
        O[i + 6].baddbmm_(torch.bmm(xd, ad), Bw[i + 6])


slots = torch.arange(1, B + 1)  # row i on adapter i (the stack's slot i + 1), as in the "view" plan
full = [(s[1], s[2]) for s in stacks]
full_bf16 = [(s[1].bfloat16(), s[2].bfloat16()) for s in stacks]


def kernel(stacks=full) -> None:
    if not lora_rows.active():
        return
    for m, (a_all, b_all), o in zip(layers, stacks, O):
        lora_rows.add_rows(X[m.in_features][:, 0], a_all, b_all, slots, o[:, 0])


def kernel_bf16() -> None:
    kernel(full_bf16)


flat = torch.cat([x.flatten() for x in A + Bw])  # the same bytes, to read once


def read() -> None:
    flat.sum()


got: dict[str, list[float]] = {k: [] for k in [*rows, "lora", "fused-A", "kernel", "kernel-bf16", "read"]}
for i in range(a.steps):
    order = list(rows) if i % 2 == 0 else list(rows)[::-1]
    for k in order:
        got[k].append(step(rows[k], caches[k], dtypes.get(k)))
    for k, fn in (("lora", lora), ("fused-A", lora_fused_a), ("kernel", kernel), ("kernel-bf16", kernel_bf16),
                  ("read", read)):
        t0 = time.perf_counter()
        fn()
        got[k].append(time.perf_counter() - t0)


def q(v, f):
    v = sorted(v)
    return v[int(f * (len(v) - 1))] * 1e3


print(f"SmolLM2-135M fp32, {B} rows x {T} cached tokens, {a.threads} threads, {a.steps} steps each; "
      f"{len(layers)} LoRA layers, adapters' stacks {nbytes / 1e6:.0f} MB")
print("                    min      q25   median  (ms)")
for k, v in got.items():
    print(f"{k:14s} {q(v, 0):8.1f} {q(v, 0.25):8.1f} {q(v, 0.5):8.1f}")
b, m, rd, lo = (q(got[k], 0.25) for k in ("base rows", "16 adapters", "read", "lora"))
print(f"step ratio base/mixed (q25): {b / m:.3f}; mixed - base {m - b:.1f} ms; LoRA GEMMs alone {lo:.1f} ms, "
      f"reading their bytes {rd:.1f} ms ({nbytes / rd / 1e6:.1f} GB/s)")
print(f"bound with fp32 adapters read once per step: base / (base + read) = {b / (b + rd):.3f}")
print("load:", os.popen("uptime").read().strip())
