"""The machine side of a run: peak memory and how many CPU threads to use."""
from __future__ import annotations

import os
import resource
import time

import torch


# CPU flags (/proc/cpuinfo) of native bf16 matmuls: AVX512-BF16 dot products, AMX tiles. Without
# them torch emulates bf16 through fp32 conversions: on this project's AVX2 machine a bf16 2048²
# linear took 1/0.65 = 1.5x the fp32 time, so bf16 there only costs.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for ln in f if ln.startswith("flags") for w in ln.split(":", 1)[1].split()}
    except OSError:
        return set()


# The one switch over what slimtune detects about the CPU (README, docs/speed.md): "1" acts as on an
# AVX512-BF16 / AMX machine, "0" as on an AVX2-only one, unset = read /proc/cpuinfo. It exists so
# that every machine can run both branches of each CPU-dependent decision (the suite's
# `--cpu-bf16` option sets it for all its processes); bf16 on an AVX2 CPU is emulated, slow but
# correct.
CPU_BF16_ENV = "SLIMTUNE_CPU_BF16"


def cpu_bf16() -> tuple[bool, str]:
    """(native, why): whether this CPU computes bf16 natively, by its flags or by the
    SLIMTUNE_CPU_BF16 override."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={forced!r}: use 1 (act as a native-bf16 CPU), 0 (as an AVX2-only "
                             "one), or leave it unset to read the CPU's flags")
        if forced == "1":
            return True, f"{CPU_BF16_ENV}=1 forces native bf16"
        return False, f"{CPU_BF16_ENV}=0 forces no native bf16 (as on an AVX2-only CPU)"
    have = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    if have:
        return True, f"this CPU computes bf16 natively ({', '.join(have)})"
    return False, "this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag: bf16 would be emulated, slower than fp32)"


def cpu_summary() -> str:
    """One line naming the CPU's bf16-relevant flags and what `train.precision: auto` picks here
    (printed by .ci/run before the tests, so a red run says which kind of machine it was)."""
    flags = cpu_flags()
    rel = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    prec, why = precision_choice("auto")
    forced = os.environ.get(CPU_BF16_ENV)
    return (f"CPU: {_cpu_model()}, {os.cpu_count()} cores; flags: {' '.join(rel) or 'none of avx2/avx512f/avx512_bf16/amx'}"
            f"{f'; {CPU_BF16_ENV}={forced}' if forced else ''}; train.precision=auto -> {prec} ({why})")


def precision_choice(precision: str) -> tuple[str, str]:
    """(precision, why) for train.precision: "auto" -> bf16 (fp16 without bf16 support) on a CUDA
    GPU, bf16 on a CPU that computes it natively (AVX512-BF16 / AMX), else fp32; as given otherwise.
    bf16 means a bf16 frozen base under autocast with fp32 trained parameters (job.py, trainer.py)."""
    if precision != "auto":
        return precision, f"train.precision={precision}"
    if torch.cuda.is_available():
        p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return p, f"train.precision=auto: {p} autocast on the GPU"
    native, why = cpu_bf16()
    return ("bf16", f"train.precision=auto: bf16 ({why}; trained parameters in fp32)") if native else \
        ("fp32", f"train.precision=auto: fp32 ({why})")


def resolve_precision(precision: str) -> str:
    """train.precision as the run uses it (precision_choice)."""
    return precision_choice(precision)[0]


BASE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def busy_cores(window: float = 0.3) -> float:
    """Cores other processes keep busy right now: non-idle CPU time over `window` seconds from
    /proc/stat (this process sleeps meanwhile). The 1-minute load average is the fallback; it
    lags, so a run started right after another one would see the finished run as load."""
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]) - idle, sum(vals[:8])
    a = sample()
    if a is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window)
    b = sample()
    total = max(b[1] - a[1], 1)
    cores = os.cpu_count() or 1
    return cores * (b[0] - a[0]) / total


_AUTO_THREADS: list[tuple[int, str]] = []  # the automatic choice, made once per process


def set_cpu_threads(requested: int | None, log=print) -> int:
    """Torch's CPU ops spin-wait on every thread: with more threads than free cores (other
    processes busy) a step gets ~8x slower (measured: 19 s vs 2.5 s for a SmolLM2 step on 2 cores
    with one core taken). So use only the cores other processes leave free right now."""
    n = requested
    why = "train.cpu_threads"
    if n is None and _AUTO_THREADS:  # decided once per process (run_train, then its Trainer)
        n, why = _AUTO_THREADS[0]
    elif n is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = busy_cores()
        n = max(1, min(cores, int(cores - busy + 0.5)))
        why = f"{cores} cores, {busy:.1f} busy with other processes"
        _AUTO_THREADS.append((n, why))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        log(f"cpu: {n} thread(s) ({why})")
    return n


def cpu_step_clock() -> float:
    """Seconds of CPU this process has used, over torch's thread count: what a training step costs in
    compute. Why not wall time: on a machine other processes share, a step's wall time grows with their
    load, so a time budget in wall seconds buys fewer steps when the machine is busy; the process's own
    CPU time does not (time.process_time counts every thread of the process). Divided by the threads,
    it equals wall time on a quiet machine (search/compare `--budget-clock cpu`, docs/search.md). On a
    GPU the work is not on this clock: budgets there use wall time."""
    return time.process_time() / max(1, torch.get_num_threads())
