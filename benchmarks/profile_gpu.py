"""Kernel-time and host-time breakdown of training steps and inference forwards (GPU; for finding
the gap). Scenario names are bench training set-ups; `infer:NAME` profiles no-grad forwards of
base / slimtune / slimtune_merged / peft instead.

    PYTHONPATH=src python benchmarks/profile_gpu.py gpu-0.85b frozen,slimtune,infer:base,infer:slimtune_merged
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from slimtune.bench.core import PRESETS, TRAIN_SETUPS, build_model
from slimtune.bench.scenarios import _peft_cfg, _slim_cfg

p = PRESETS[sys.argv[1] if len(sys.argv) > 1 else "gpu-0.85b"]
scenarios = sys.argv[2].split(",") if len(sys.argv) > 2 else ["frozen", "slimtune"]
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 25
model = build_model(p)
x = torch.randint(0, p.model["vocab_size"], (p.batch, p.seq), device=p.device)


def infer_setup(name):
    import peft
    import slimtune

    if name == "base":
        return model, lambda: None
    if name == "peft":
        pm = peft.get_peft_model(model, _peft_cfg(p, init_lora_weights=False))
        return pm, pm.unload
    sm = slimtune.get_peft_model(model, _slim_cfg(p))
    if name == "slimtune_merged":
        sm.merge_adapter()
    return sm, sm.unload


for name in scenarios:
    if name.startswith("infer:"):
        m, teardown = infer_setup(name[6:])
        m.eval()

        def step():
            with torch.no_grad():
                m(input_ids=x)
    else:
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
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    print(f"---- {name}: top host time")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
    teardown()
    model.train()
