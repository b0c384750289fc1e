"""Kernel-time breakdown of one training step, floor vs slimtune LoRA (GPU; for finding the gap).

    PYTHONPATH=src python benchmarks/profile_gpu.py gpu-0.85b > profile.txt
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from slimtune.bench.core import PRESETS, TRAIN_SETUPS, build_model

p = PRESETS[sys.argv[1] if len(sys.argv) > 1 else "gpu-0.85b"]
scenarios = sys.argv[2].split(",") if len(sys.argv) > 2 else ["frozen", "slimtune"]
model = build_model(p)
x = torch.randint(0, p.model["vocab_size"], (p.batch, p.seq), device=p.device)
for name in scenarios:
    m, params, teardown = TRAIN_SETUPS[name](model, p)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        m(input_ids=x, labels=x).loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"==== {name} (2 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    teardown()
