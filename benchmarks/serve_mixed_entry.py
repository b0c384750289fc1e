"""What a new mixed batch costs before its first forward: every LoRA layer's plan for it
(`MixedLinear._mixed_plan`: the check that its stack of adapters is current, and the row plan).

The server enters a new mixed batch whenever its rows change: at each wave of the serve bench, the
first row's prefill and decode, the prefill of the 15 that join, the 16-row decode batch and the
15-row batch after the first row leaves (4 per wave). SmolLM2-135M fp32, the bench's 16 adapters
(210 LoRA layers); batches of 15 rows in slot order, each a new `mixed_batch`; the median of 10.

Run: python benchmarks/serve_mixed_entry.py   (before/after: PYTHONPATH=<other checkout>/src)
"""
import time

import torch

import slimtune
from slimtune.bench import serve as bench
from slimtune.methods.lora_mixed import MixedLinear

torch.set_num_threads(2)
torch.set_grad_enabled(False)
print("slimtune from", slimtune.__file__)
pm, names = bench.preset_in_process("serve-mixed-entry-")
tuner = pm.base_model
layers = [m for m in tuner.modules() if isinstance(m, MixedLinear)]


def entry(rows: list[str]) -> float:
    with tuner.mixed_batch(rows):
        t0 = time.perf_counter()
        for layer in layers:
            layer._mixed_plan(torch.float32)
        return time.perf_counter() - t0


entry(names)  # builds the stacks once, as the server's warm-up does
ts = [entry(sorted((names[i:] + names[:i])[:15], key=names.index)) for i in range(10)]
print(f"{len(layers)} LoRA layers, 16 adapters: a new mixed batch's plans take {sorted(ts)[5] * 1e3:.1f} ms "
      f"(median of 10; min {min(ts) * 1e3:.1f} ms)")
