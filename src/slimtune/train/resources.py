"""The machine side of a run: peak memory and how many CPU threads to use."""
from __future__ import annotations

import os
import resource

import torch


def resolve_precision(precision: str) -> str:
    """"auto" -> bf16 (fp16 without bf16 support) on a CUDA GPU, fp32 on CPU; else as given."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


BASE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def set_cpu_threads(requested: int | None, log=print) -> int:
    """Torch's CPU ops spin-wait on every thread: with more threads than free cores (other
    processes busy) a step gets ~8x slower (measured: 19 s vs 2.5 s for a SmolLM2 step on 2 cores
    with one core taken). So use only the cores the 1-minute load average leaves free."""
    n = requested
    why = "train.cpu_threads"
    if n is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        n = max(1, min(cores, int(cores - busy + 0.5)))
        why = f"{cores} cores, load average {busy:.1f}"
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        log(f"cpu: {n} thread(s) ({why})")
    return n
