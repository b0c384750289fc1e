"""`slimtune search --workers N`: the command itself is one worker, and it starts N-1 more local
processes (`python -m slimtune.search.pool SPEC.json`) on the same study.

A worker process runs the search loop only: it opens the same storage, asks for trials, trains and
tells until the count is reached, then exits. It does not lock OUT (the command that started it
holds the lock), does not settle earlier sessions (the command did, before starting it) and writes no
report: the command waits for its workers, then measures the best trial on the test split and
writes search.md / best.yaml once. Trials go to OUT/trials/trial-NNNN whichever process ran them, and
each worker's output to OUT/workers/worker-K.log.

Workers on other machines are the same command with the same --storage URL: each is a command of
its own (its own OUT, its own report of the whole study).

A worker dies with the command (PR_SET_PDEATHSIG on Linux) and is SIGTERMed when the command stops
early, so no process goes on training into a folder the next session will use. A worker that is
killed alone stops beating; its trial goes stale and another worker runs it again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..train.config import JobConfig, saved_form


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def spawn(cfg: JobConfig, opts, n: int, out: Path) -> list[subprocess.Popen]:
    """Start n worker processes on opts' storage; each logs to OUT/workers/worker-K.log."""
    folder = out / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    d = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    d.update(out=str(out), role="worker", workers=1, overwrite=False)
    spec = {"config": saved_form(cfg), "options": d}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=2, default=str))
    procs = []
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    for k in range(n):
        with open(folder / f"worker-{k + 1}.log", "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", "slimtune.search.pool", str(path)], stdout=f,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent, env=env))
    return procs


def wait(procs: list[subprocess.Popen], out: Path, log) -> list[str]:
    """Wait for the workers (each ends when the count is reached); what the ones that failed said."""
    bad = []
    for k, p in enumerate(procs):
        rc = p.wait()
        if rc != 0:
            tail = (out / "workers" / f"worker-{k + 1}.log").read_text(errors="replace").strip().splitlines()[-3:]
            bad.append(f"worker {k + 1} (pid {p.pid}) exited with {rc}: {' / '.join(tail)[:300]}")
            log(bad[-1])
    return bad


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each worker still running (their trials are then re-run), then make sure they are gone."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def main(argv: list[str]) -> int:
    from ..cli.errors import _known_errors, message
    from .study import SearchOptions, run_search

    spec: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    o = dict(spec["options"])
    o["out"] = Path(o["out"])
    opts = SearchOptions(**o)
    cfg = JobConfig.model_validate(spec["config"])
    try:
        run_search(cfg, opts, log=lambda m: print(m, flush=True))
    except _known_errors() as e:  # the store went away, ...: one line in the worker's log, exit 2
        print(f"error: {message(e)}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
