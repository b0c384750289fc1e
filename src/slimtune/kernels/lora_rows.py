"""The mixed-adapter LoRA kernel (csrc/lora_rows.cpp): each row of a batch adds its own adapter's
LoRA term, read straight from the layer's stack of adapters, in one call per layer: at every decode
step, and at prefills on AVX-512 builds (`prefill_ranks`).

Why: at decode every row is one token, so a mixed batch's LoRA term is two GEMVs per row. As torch
ops (`lora_mixed._mixed_forward`'s two `bmm` per layer) the small GEMMs cost about as much again as
the bytes they read; the kernel streams each row's weights once through FMA loops, prefetching the
next row's adapter while this one computes, and widens a bf16 stack to fp32 in registers (half the
bytes, fp32 arithmetic, so it needs no native bf16 unit). A prefill (T tokens a row) runs the same
term in blocks of tokens held in registers; it is used where it beats torch's bmm (AVX-512 builds:
no widened copy of a bf16 stack per prefill), and prefills keep the bmm elsewhere.

Built on first use with torch's C++ extension builder (gcc and ninja, `-O3 -march=native`) into
torch's extension cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), under a name
that hashes the source, the flags and this CPU's feature flags: a build is never reused on a CPU
with other instructions. Nothing builds or switches on by itself: `enable(mode)` does, and the
server calls it at start-up (`--lora-kernel`), so a library user's `mixed_batch` runs the torch ops
unless they call `enable` too.

    enable("auto")  # build; if that fails, say why and keep the torch ops
    enable("on")    # build, or raise KernelUnavailable with the compiler's message
    enable("off")   # the torch ops
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from ..train.resources import cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "lora_rows.cpp"
RANKS = (8, 16, 32, 64)  # the ranks the kernel is compiled for: a stack's rank is padded up to one
MODES = ("auto", "on", "off")

_OP = None  # the built extension's add_rows while enabled, else None
_PREFILL: tuple[int, ...] = ()  # the ranks whose prefills the enabled build runs (AVX-512 builds: 16, 32, 64)
_BUILT: dict[str, object] = {}  # arch -> module, built (or loaded) once per process
_STATE = {"why": "not enabled (lora_rows.enable)", "build_s": None, "arch": None}  # the last enable's


class KernelUnavailable(RuntimeError):
    """The kernel could not be built here; the message says why and what to pass instead."""


def build(arch: str = "native"):
    """Compile (or load from the cache) the extension for `-march=<arch>`; its module. `arch` other
    than native builds the kernel for an older instruction set on this machine (the tests force the
    AVX2 build, x86-64-v3, on an AVX-512 CPU). Raises KernelUnavailable."""
    if arch in _BUILT:
        return _BUILT[arch]
    # -fopenmp: at::parallel_for is inline OpenMP in ATen's headers, so without it the rows run on one
    # thread (measured: 16.4 ms at 2 threads as at 1); the extension then links libgomp.so.1, which the
    # loader resolves to the one torch already loaded (same soname): one OpenMP runtime in the process
    flags = ["-O3", f"-march={arch}", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):  # an x86 gcc option: AVX-512 CPUs get 512-bit vectors
        flags.append("-mprefer-vector-width=512")
    cpu = " ".join(sorted(cpu_flags())) or platform.processor() or platform.machine()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), cpu, torch.__version__]).encode())
    name = f"slimtune_lora_rows_{key.hexdigest()[:16]}"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        _drop_stale_lock(Path(_get_build_directory(name, False)))
        if shutil.which("ninja") is None:  # the ninja package's binary, when its venv is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        _BUILT[arch] = load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
        return _BUILT[arch]
    except Exception as e:  # the compiler, ninja or the loader: the compiler's own first errors, and the fixes
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower() and "subcommand failed" not in ln][:2]
        why = "; ".join(errs or lines[-1:]) or type(e).__name__
        raise KernelUnavailable(f"the mixed-LoRA decode kernel did not build ({why}): it needs gcc, the Python "
                                "headers (python3-dev), the ninja package (pip install ninja) and a writable "
                                "TORCH_EXTENSIONS_DIR; or pass --lora-kernel off to decode with torch's bmm") from None


STALE_LOCK_S = 600  # a build takes ~30 s; a lock older than this is a killed build's


def _drop_stale_lock(build_dir: Path) -> None:
    """torch's builder waits forever on its build folder's `lock` file, which a build killed midway
    (a SIGKILLed server or CI job) leaves behind: every later start would hang with no word. A lock
    older than any build is removed first."""
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


def enable(mode: str = "auto", arch: str = "native") -> str:
    """Switch the kernel on or off for every mixed batch in this process; a line saying which path
    mixed decode steps take and why (the server prints it at start-up)."""
    global _OP, _PREFILL
    if mode not in MODES:
        raise ValueError(f"lora kernel mode {mode!r}: use one of {', '.join(MODES)}")
    _OP, _PREFILL = None, ()
    if mode == "off":
        _STATE.update(why="--lora-kernel off", build_s=None, arch=None)
        return "mixed LoRA decode: torch bmm (--lora-kernel off)"
    t0 = time.perf_counter()
    try:
        mod = build(arch)
    except KernelUnavailable as e:
        _STATE.update(why=str(e), build_s=None, arch=None)
        if mode == "on":
            raise
        return f"mixed LoRA decode: torch bmm, because {e}"
    _OP, _PREFILL = mod.add_rows, tuple(mod.prefill_ranks())
    dt = time.perf_counter() - t0
    _STATE.update(why=f"-march={arch}", build_s=dt, arch=arch)
    pre = (f"prefills too at ranks {', '.join(map(str, _PREFILL))}" if _PREFILL
           else "prefills through torch bmm (no AVX-512 in this build)")
    return f"mixed LoRA decode: the lora_rows kernel (-march={arch}; built or loaded in {dt:.1f} s; {pre})"


def active() -> bool:
    return _OP is not None


def state() -> dict:
    """{'mode': 'on'|'off', 'prefill_ranks', 'why', 'build_s', 'arch'}: for /health and the tests
    (mode is whether the kernel is in use: `active()`; prefill_ranks, the ranks whose prefills it runs)."""
    return {"mode": "on" if _OP is not None else "off", "prefill_ranks": list(_PREFILL), **_STATE}


def padded_rank(r: int) -> int:
    """The rank a stack is built with while the kernel is on: r rounded up to one of RANKS (zero
    columns add no term), r itself above the largest (those layers keep the torch ops)."""
    for k in RANKS:
        if r <= k:
            return k
    return r


def usable(x: torch.Tensor, out: torch.Tensor, a_all: torch.Tensor) -> bool:
    """Whether a layer's step can take the kernel: on, fp32 activations on the CPU, an fp32 or bf16
    stack of a rank it was compiled for (a decode step: one token a row), or of a rank whose
    prefills this build runs (T tokens a row: `prefill_ranks`), and no autograd graph to keep."""
    r = a_all.shape[-1]
    return (_OP is not None and x.dtype == torch.float32 and out.dtype == torch.float32
            and x.device.type == "cpu" and out.is_contiguous() and (r in _PREFILL or (x.shape[1] == 1 and r in RANKS))
            and a_all.dtype in (torch.float32, torch.bfloat16) and a_all.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or out.requires_grad)))


def add_rows(x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] += (x[n] · A[slots[n]]) · B[slots[n]] in place; slot 0 (the base rows) adds nothing.
    x (N, in) or (N, T, in) fp32 (T > 1 only at a rank in `prefill_ranks`), A (S+1, in, r),
    B (S+1, r, out) fp32 or bf16 (the scale folded into B), slots (N,) int64, out (N, out) or
    (N, T, out) fp32, contiguous."""
    _OP(x.contiguous(), a_all, b_all, slots, out)


def prefill_ranks() -> tuple[int, ...]:
    """The ranks whose prefills (T > 1 tokens a row) the enabled kernel runs; () while off or in a
    build without AVX-512, where prefills keep torch's bmm."""
    return _PREFILL


def op():
    """The built kernel's add_rows while enabled, else None: for a caller that has checked
    `usable` once and calls it straight on later decode steps (lora_mixed's hot path); the same
    arguments as `add_rows`, with x already contiguous."""
    return _OP
