"""The mixed-LoRA decode kernel alone (kernels/csrc/lora_rows.cpp), on stacks shaped like the serve
bench's: SmolLM2-135M's 30 blocks x 7 linears, 16 adapters of r=16 plus the empty slot 0, 16 rows.
One pass calls the kernel once per layer, as a decode step does; the stacks total 332 MB in fp32
(166 MB in bf16; the empty slot 0 included, 313 / 156 MB without), more than the caches hold.

  16 adapters     row n on slot n+1: every adapter read once a pass (the serve bench's decode step)
  1 adapter x16   every row on slot 1: ~1/16 of the bytes, so what is left is the kernel's arithmetic

  read           one torch.sum over a flat copy of the same bytes (taken as fp32 words: torch's bf16
                 sum is compute-bound): a plain sequential read of that many bytes, the memory floor
                 (summing the 420 tensors one by one ran slower than the kernel: dispatch per op)

`--tokens T` (T > 1) times a prefill instead: x (16, T, in) a layer, one activation tensor per width
as in a model, where they are hot in cache (distinct ones per layer would time their memory traffic,
not the LoRA term), against torch's path for the same prefill in lora_mixed (a bf16 stack widened
to fp32, then bmm and baddbmm over the 16 rows). AVX-512 builds and ranks 16-64 only.

`--arch x86-64-v3` builds the kernel for AVX2 on this machine (as the tests do), to see what a CPU
without AVX-512 gets from the same source; `--dtype bfloat16` reads bf16 stacks (the server's
--mixed-adapter-dtype bfloat16), widened to fp32 in registers. `--repeat K` makes K times the layers
(times reported per 210 layers): past a large L3's share (this VM: 480 MB) a pass cannot be served
from cache. Checks the result against fp64 first.

Run: flock /tmp/slimtune-bench.lock python benchmarks/lora_rows_kernel.py [--arch native|x86-64-v3]
         [--dtype float32|bfloat16] [--repeat 1] [--passes 12] [--threads 2] [--tokens 40 [--r 16]]
"""
import argparse
import statistics
import time

import torch

from slimtune.kernels import lora_rows

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="native")
ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
ap.add_argument("--passes", type=int, default=12, help="timed passes per case (after 3 untimed)")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeat", type=int, default=1, help="K times the 210 layers (times per 210)")
ap.add_argument("--tokens", type=int, default=1, help="T > 1: a prefill of T tokens a row, against torch's path")
ap.add_argument("--r", type=int, default=16, help="the stacks' rank (16, 32 or 64 for a prefill)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
t0 = time.perf_counter()
mod = lora_rows.build(a.arch)
print(f"kernel -march={a.arch} built or loaded in {time.perf_counter() - t0:.1f} s; {a.dtype} stacks, {a.threads} threads")
dt = getattr(torch, a.dtype)
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30 * a.repeat  # q k v o gate up down
g = torch.Generator().manual_seed(0)
T, R = a.tokens, a.r
acts: dict = {}  # a prefill's x and out, one per width (hot in cache, as a model's activations are)


def act(kind, shape):
    return acts.setdefault((kind, shape), torch.randn(*shape, generator=g)) if T > 1 else torch.randn(*shape, generator=g)


layers = []
for d_in, d_out in SHAPES:  # (A (17, in, R), s·B (17, R, out), x (16, [T,] in), out (16, [T,] out)); slot 0 zeros
    A = (torch.randn(17, d_in, R, generator=g) * 0.05).to(dt)
    B = (torch.randn(17, R, d_out, generator=g) * 0.05).to(dt)
    A[0], B[0] = 0, 0
    tok = (T,) if T > 1 else ()
    layers.append((A, B, act("x", (16, *tok, d_in)), act("out", (16, *tok, d_out)).zero_()))
MB = sum(A.nbytes + B.nbytes for A, B, _, _ in layers) / 1e6
print(f"{len(layers)} layers, stacks {MB:.0f} MB, rank {R}" + (f", a prefill of {T} tokens a row" if T > 1 else ""))

A, B, x, out = layers[4]
slots = torch.arange(1, 17)
want = torch.einsum("n...i,nir,nro->n...o", x.double(), A[slots].double(), B[slots].double())
got = torch.zeros(out.shape)
mod.add_rows(x, A, B, slots, got)
print(f"max |kernel - fp64| {(got.double() - want).abs().max().item():.1e} (|out| up to {want.abs().max().item():.2f})")


def timed(fn) -> float:
    """Median seconds of a pass, per 210 layers."""
    ts = []
    for i in range(3 + a.passes):
        t0 = time.perf_counter()
        fn()
        if i >= 3:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / a.repeat


def run(sl):
    for A, B, x, out in layers:
        mod.add_rows(x, A, B, sl, out)


FLAT = torch.cat([t.view(torch.float32).flatten() for A, B, _, _ in layers for t in (A, B)])


def read():
    FLAT.sum()


def torch_prefill():
    """lora_mixed's path for a prefill whose rows are the stack's slots in order: widen, bmm, baddbmm."""
    for A, B, x, out in layers:
        au, bu = A[1:], B[1:]
        if au.dtype != torch.float32:
            au, bu = au.float(), bu.float()
        out.baddbmm_(torch.bmm(x, au), bu)


if T > 1:
    tk, tt = timed(lambda: run(slots)), timed(torch_prefill)
    gf = 2 * 16 * T * R * sum(i + o for i, o in SHAPES) / a.repeat / 1e9
    print(f"kernel         median {tk * 1e3:6.2f} ms a pass ({gf / tk:.0f} GFLOP/s)")
    print(f"torch          median {tt * 1e3:6.2f} ms a pass ({gf / tt:.0f} GFLOP/s): kernel / torch {tk / tt:.2f}")
    raise SystemExit(0)
for name, fn in [("16 adapters", lambda: run(torch.arange(1, 17))), ("1 adapter x16", lambda: run(torch.ones(16, dtype=torch.long))),
                 ("read", read)]:
    t = timed(fn)
    rate = f", {MB / a.repeat / t / 1e3:.1f} GB/s of the stacks' bytes" if name != "1 adapter x16" else ""
    print(f"{name:14s} median {t * 1e3:6.2f} ms a pass{rate}")
