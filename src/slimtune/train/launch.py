"""Launching one run as several processes: rank 0 owns the run folder, the others follow it; and
`slimtune train --nproc N`, which runs the same command under torchrun on this machine.

    claim(cfg, log, dist)      rank 0 locks and settles the folder (rundir.claim); the others get
                               its decision, or its refusal, and hold no lock
    QuietLog                   the log of ranks other than 0 (their own errors only)
    launch_command / spawn     torchrun on 127.0.0.1 and a free port
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .config import JobConfig
from .distributed import Dist, DistributedError


@contextlib.contextmanager
def claim(cfg: JobConfig, log: Callable[[str], None], dist: Dist):
    """rundir.claim on rank 0 (the lock, recovery, resume / overwrite decision); the other ranks
    receive its decision, or its refusal, and hold no lock."""
    from . import rundir

    if dist.world == 1:
        with rundir.claim(cfg, log) as c:
            yield c
        return
    import torch.distributed as dist_

    c = err = None
    if dist.is_main:
        try:
            c = rundir.claim(cfg, log)
        except Exception as e:  # noqa: BLE001 - sent to the others, then raised here as it was
            err = e
        msg = [None if err is None else str(err),
               None if c is None else (c.resume_from, c.init_from, list(c.notes))]
        dist_.broadcast_object_list(msg, src=0)
        if err is not None:
            raise err
    else:
        msg = [None, None]
        dist_.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise DistributedError(f"rank 0 refused the run: {msg[0]}")
        out = Path(cfg.output_dir).expanduser()
        resume_from, init_from, notes = msg[1]
        c = rundir.Claim(out, rundir.RunLock(out), resume_from=resume_from, init_from=init_from, notes=notes)
    try:
        yield c
    finally:
        c.release()


class QuietLog:
    """The log of ranks other than 0: the run's log and progress are rank 0's; this rank's own
    errors go to its stderr (torchrun prefixes them with the rank)."""

    path = "this process's stderr (rank 0 keeps OUTPUT_DIR/train.log)"

    def __call__(self, msg: str) -> None:
        pass

    def write(self, msg: str) -> None:
        if msg.startswith("error:"):
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


# ---- `slimtune train --nproc N` ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(argv: list[str], nproc: int, port: int | None = None) -> list[str]:
    """torchrun on this machine, loopback rendezvous on a free port, running `slimtune train ARGV`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), "-m", "slimtune", "train", *argv]


def refuse(cfg: JobConfig) -> None:
    """What the config alone says several processes cannot run, before any process starts (each
    rank says the same again where it is launched by hand, objectives/hooks.py)."""
    from .objectives import OBJECTIVES

    if cfg.train.distributed == "fsdp" and callable(getattr(OBJECTIVES[cfg.train.objective], "sample", None)):
        raise DistributedError(f"train.objective={cfg.train.objective} under train.distributed=fsdp: each rank samples "
                               "its own prompts' completions, which end after different numbers of decoding steps, "
                               "while every FSDP forward gathers the weights with all ranks in step; use "
                               "train.distributed=ddp (each rank holds the model; the adapter is small)")


def spawn(argv: list[str], nproc: int, cfg: JobConfig | None = None) -> int:
    """Run the job under torchrun with `nproc` processes and return its exit code."""
    if os.environ.get("WORLD_SIZE"):
        raise DistributedError("--nproc: this process was itself started by a launcher (WORLD_SIZE is set); drop "
                               "--nproc and let the launcher's --nproc_per_node decide")
    if cfg is not None:
        refuse(cfg)
    return subprocess.call(launch_command(argv, nproc))
