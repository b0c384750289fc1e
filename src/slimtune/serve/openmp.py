"""One OpenMP thread pool in a serving process: the engine thread's.

torch's CPU wheels for Linux run their parallel ops on GNU OpenMP (libgomp), which keeps one pool of
worker threads per thread that starts parallel work. A server loads the model and its adapters on the
main thread (a pool of `threads - 1` workers) and then decodes on the engine thread (a second pool).
Once libgomp manages more threads than there are CPUs it *throttles* its workers: they stop spinning
between parallel regions after ~100 spins instead of ~300,000 and sleep on a futex, so every small
op of a decode step (a 16-row linear, a LoRA kernel call: thousands per step) pays a wake-up of tens
of microseconds. Measured on a 2-core VM (docs/serving.md, "One OpenMP pool"): the decode kernel ran
at one thread's speed on the engine thread and twice as fast on the main thread, until the main
thread's pool was released.

`release_pool()` frees the calling thread's pool through OpenMP 5's `omp_pause_resource_all`
(libgomp frees the caller's pool; another thread's is untouched). Under `--dedicated-cpus` the engine
calls it on the thread that starts it, before the engine thread exists; if that thread later runs
parallel torch work again, libgomp simply makes a new pool. Nothing happens where libgomp is not the
loaded runtime.

Why it is not the default: unthrottled workers spin, and beside other busy processes (or under a
container's CPU quota) a spinning team waits at each barrier for a worker the OS has descheduled.
Measured on the same VM with two niced training processes running: the kernel's calls took ~6 ms
each instead of ~0.12 ms. The throttled default degrades gracefully there; a server with its CPUs to
itself should pass `--dedicated-cpus`.
"""
from __future__ import annotations

import ctypes
import os

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what can be rebuilt


def release_pool() -> bool:
    """Free the calling thread's libgomp thread pool; True when one was freed (or there was none to
    free), False when libgomp is not loaded in this process or cannot pause (an older runtime)."""
    try:  # RTLD_NOLOAD: only the libgomp already in the process (torch's own copy), never a second one
        gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        pause = gomp.omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(OMP_PAUSE_SOFT) == 0
