"""What a benchmark run prints and writes: ratios, machine and versions, the table, the Markdown."""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

import slimtune

if TYPE_CHECKING:
    from .core import Row
    from .presets import Preset


def _ratios(rows: list[Row]) -> dict:
    by = {(r.group, r.scenario): r for r in rows}
    out: dict[str, float] = {}

    def put(key, a, b, attr="ms"):
        ra, rb = by.get(a), by.get(b)
        if ra and rb and getattr(ra, attr) and getattr(rb, attr):
            out[key] = round(getattr(ra, attr) / getattr(rb, attr), 3)
        if attr == "ms":  # the same ratio in process CPU time (the robust one on a shared CPU machine)
            put("cpu_" + key, a, b, "cpu_ms")

    for s in ("peft", "peft_bf16", "slimtune", "slimtune_shared", "slimtune_function", "slimtune_perlayer", "full",
              "frozen+liger", "slimtune+liger", "frozen_chunked_ce", "slimtune_chunked_ce", "frozen_compile",
              "slimtune_compile", "peft_bf16_compile", "slimtune_compile_graphs", "slimtune_compile_perlayer", "frozen_compile_graphs", "slimtune_offload"):
        put(f"train_{s}_vs_floor", ("train", s), ("train", "frozen"))
        put(f"mem_{s}_vs_floor", ("train", s), ("train", "frozen"), "mem_mib")
    put("train_slimtune_vs_peft", ("train", "slimtune"), ("train", "peft"))
    from .methods import METHODS  # LoHa / LoKr / VeRA / OFT rows (bench/methods.py)

    for m in METHODS:
        for lib in ("peft", "slimtune"):
            put(f"train_{lib}_{m}_vs_floor", ("train", f"{lib}_{m}"), ("train", "frozen"))
            put(f"mem_{lib}_{m}_vs_floor", ("train", f"{lib}_{m}"), ("train", "frozen"), "mem_mib")
        put(f"train_slimtune_{m}_vs_peft", ("train", f"slimtune_{m}"), ("train", f"peft_{m}"))
    put("train_slimtune_compile_vs_compiled_floor", ("train", "slimtune_compile"), ("train", "frozen_compile"))
    put("train_slimtune_compile_graphs_vs_compiled_floor", ("train", "slimtune_compile_graphs"), ("train", "frozen_compile_graphs"))
    put("train_slimtune_compile_vs_peft_bf16_compile", ("train", "slimtune_compile"), ("train", "peft_bf16_compile"))
    put("train_slimtune_vs_peft_bf16", ("train", "slimtune"), ("train", "peft_bf16"))
    for s in ("peft", "slimtune", "slimtune_merged"):
        put(f"infer_{s}_vs_base", ("infer", s), ("infer", "base"))
    put("infer_slimtune_vs_peft", ("infer", "slimtune"), ("infer", "peft"))
    put("infer_base_compile_vs_base", ("infer", "base_compile"), ("infer", "base"))
    put("infer_slimtune_compile_vs_base", ("infer", "slimtune_compile"), ("infer", "base"))
    put("infer_slimtune_compile_vs_base_compile", ("infer", "slimtune_compile"), ("infer", "base_compile"))
    put("paired_slimtune_vs_floor", ("paired", "slimtune"), ("paired", "frozen"))  # the median pair ratio: checks
    put("paired_peft_vs_floor", ("paired", "peft"), ("paired", "frozen_peft"))
    put("paired_infer_slimtune_vs_base", ("paired_infer", "slimtune"), ("paired_infer", "base"))
    put("paired_infer_peft_vs_base", ("paired_infer", "peft"), ("paired_infer", "base_peft"))
    put("mixed_peft_vs_base", ("mixed", "peft"), ("mixed", "base"))
    put("mixed_slimtune_vs_base", ("mixed", "slimtune"), ("mixed", "base"))
    put("mixed_peft_vs_slimtune", ("mixed", "peft"), ("mixed", "slimtune"))
    b, pe, sl = by.get(("mixed", "base")), by.get(("mixed", "peft")), by.get(("mixed", "slimtune"))
    if b and pe and sl and sl.ms > b.ms:
        out["mixed_overhead_peft_vs_slimtune"] = round((pe.ms - b.ms) / (sl.ms - b.ms), 2)
    return out


def _meta(p: Preset, seconds: float) -> dict:
    import peft
    import transformers


    dev = torch.cuda.get_device_name() if p.device == "cuda" else (platform.processor() or platform.machine())
    cpu = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"preset": asdict(p), "device": dev, "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "slimtune": slimtune.__version__, "python": platform.python_version(),
            "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(seconds, 1),
            "memory_measure": "cuda max_memory_allocated" if p.device == "cuda" else
            "weights + saved-for-backward tensors + grads + AdamW state (see slimtune.bench.core docstring)"}


def format_table(result: dict) -> str:
    from .methods import METHODS

    rows, ratios = result["rows"], result["ratios"]
    by = {(r["group"], r["scenario"]): r for r in rows}
    base = {"train": by.get(("train", "frozen")), "infer": by.get(("infer", "base")), "mixed": by.get(("mixed", "base"))}
    peft_ref = {"train": by.get(("train", "peft")), "infer": by.get(("infer", "peft")), "mixed": by.get(("mixed", "peft"))}
    on_cpu = result["meta"]["preset"]["device"] == "cpu"
    head = ("| group | scenario | ms/step | tokens/s | peak MiB | × floor/base (time) | × floor (mem) | × PEFT (time) |"
            + (" CPU ms/step | × floor/base (CPU) | × PEFT (CPU) |" if on_cpu else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    paired_floor = None
    for r in rows:
        if r["group"].startswith("paired"):  # rows come as (floor, LoRA) pairs: each LoRA row against its own floor
            if r["scenario"].startswith(("frozen", "base")):
                paired_floor = r
            b, pr = paired_floor, None
        else:
            b, pr = base[r["group"]], peft_ref[r["group"]]
            method = r["scenario"].split("_", 1)[-1]
            if r["group"] == "train" and method in METHODS:  # slimtune_loha against peft_loha, not PEFT's LoRA
                pr = by.get(("train", f"peft_{method}")) if r["scenario"] == f"slimtune_{method}" else None
        vs_peft = pr and r["scenario"] not in ("frozen", "base", "base_compile", "full", "frozen+liger", "frozen_chunked_ce", "frozen_compile", "frozen_compile_graphs")
        t_ratio = f"{r['ms'] / b['ms']:.3f}" if b else ""
        m_ratio = f"{r['mem_mib'] / b['mem_mib']:.3f}" if b and r["mem_mib"] and b["mem_mib"] else ""
        p_ratio = f"{r['ms'] / pr['ms']:.3f}" if vs_peft else ""
        mem = f"{r['mem_mib']:.0f}" if r["mem_mib"] else ""
        line = (f"| {r['group']} | {r['scenario']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {mem} | "
                f"{t_ratio} | {m_ratio} | {p_ratio} |")
        if on_cpu:
            c = r.get("cpu_ms")
            line += (f" {c:.0f} | " if c else " | ") + (f"{c / b['cpu_ms']:.3f}" if c and b and b.get("cpu_ms") else "") \
                + " | " + (f"{c / pr['cpu_ms']:.3f}" if c and vs_peft and pr.get("cpu_ms") else "") + " |"
        lines.append(line)
    for r in rows:
        if r.get("note"):
            lines.append(f"\n{r['group']} {r['scenario']}: {r['note']}")
    if "mixed_overhead_peft_vs_slimtune" in ratios:
        lines.append(f"\nmixed batch: PEFT's LoRA overhead over the base forward is "
                     f"{ratios['mixed_overhead_peft_vs_slimtune']}× slimtune's")
    if result.get("checks"):
        lines.append("checks (slimtune vs PEFT, same adapter weights): " +
                     ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in result["checks"].items()))
    return "\n".join(lines)


def _markdown(result: dict, cmd: str) -> str:
    from .core import TARGETS  # the scenarios' constant (core imports this module)

    m = result["meta"]
    return (f"# slimtune bench: preset {m['preset']['name']}\n\n"
            f"`{cmd}` — {m['when_utc']}, {m['wall_s']} s\n\n"
            f"device: {m['device']} ({m['cpu']}, {m['cpu_count']} cpus, torch threads {m['torch_threads']}); "
            f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, slimtune {m['slimtune']}, "
            f"python {m['python']}\n\n"
            f"model {m['preset']['model']}, batch {m['preset']['batch']}×{m['preset']['seq']}, "
            f"{m['preset']['dtype']}; LoRA r={m['preset']['r']} α={m['preset']['alpha']} on {', '.join(TARGETS)}; "
            f"memory: {m['memory_measure']}\n\n" + format_table(result) + "\n")
