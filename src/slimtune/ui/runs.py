"""Run folders as the UI sees them: found under a root, each with its state, curves and summary.

A run is read from its own files only (train/rundir.py names them): the lock (`.slimtune.lock`, whose
pid says whether the process still lives), `summary.json` (written last, whole), `metrics.jsonl`
(appended while it trains: a line cut mid-write is skipped) and `train.log` (progress, the error of a
failed run). Nothing here writes, and nothing raises on a corrupt or half-written folder: what cannot
be read is reported as such on the page.
"""
from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

from ..train.lock import LOCK_NAME, _alive
from ..train.rundir import checkpoints, is_run

MAX_DEPTH = 3  # runs/<compare>/<method>/ is as deep as slimtune writes runs
# trackers' stores next to runs (an MLflow artifact folder holds adapter/ copies: not runs of their own)
NOT_RUNS = {"mlartifacts", "mlruns", "wandb", "tensorboard"}
STEP_RE = re.compile(r"step (\d+)/(\d+)")


class OutsideRoot(ValueError):
    """A path that leaves the runs folder (.., an absolute path, a symlink out)."""


def inside(root: Path, rel: str) -> Path:
    """`root/rel` resolved, refused unless it stays inside root (symlinks followed first)."""
    if not rel or "\x00" in rel or Path(rel).is_absolute():
        raise OutsideRoot(f"'{rel}' is not a folder under the runs folder")
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise OutsideRoot(f"'{rel}' is outside the runs folder")
    return p


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def holder(out: Path) -> dict[str, Any] | None:
    """The lock's content if a live process on this host holds it (the run is training now)."""
    info = _json(out / LOCK_NAME)
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    return info if isinstance(pid, int) and _alive(pid) else None


def _last_session(out: Path, limit: int = 200_000) -> str:
    """The tail of train.log from the latest session's header on."""
    try:
        with open(out / "train.log", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    i = text.rfind("\n=== ")
    return text[i:] if i >= 0 else text


def status(out: Path) -> tuple[str, str]:
    """(running | finished | interrupted | failed, a phrase why) from the folder's own files."""
    if holder(out) is not None:
        return "running", "its process holds the folder's lock"
    s = _json(out / "summary.json")
    s = s if isinstance(s, dict) else None
    log = _last_session(out).splitlines()  # the latest session: a resumed run is judged by how it went
    err = next((i for i in range(len(log) - 1, -1, -1) if log[i].startswith("error:")), None)
    stop = next((x for x in reversed(log) if x.startswith("stopped:")), None)
    if s is not None and s.get("error"):
        return "failed", str(s["error"])[:300]
    if err is not None:
        tail = [x for x in log[err:] if x.strip() and not x.startswith((" ", "Traceback"))]
        return "failed", (tail[-1] if tail else log[err])[:300]
    if stop is not None:
        return "interrupted", stop[len("stopped:"):].strip()[:300]
    if s is not None:
        st = str(s.get("status", "finished"))
        if st == "interrupted":
            return "interrupted", f"stopped at step {s.get('steps')} of {s.get('total_steps')}"
        return "finished", f"{st} at step {s.get('steps')} of {s.get('total_steps')}"
    cks = checkpoints(out)
    return "interrupted", ("ended without a summary (killed?)" + (f"; last checkpoint {cks[-1].name}" if cks else ""))


def metrics(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records; lines a writer has not finished (or garbage) are skipped."""
    try:
        text = (out / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        return []
    recs = []
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), (int, float)):
            recs.append(r)
    return recs


def progress(out: Path, recs: list[dict[str, Any]], summary: Any) -> tuple[int | None, int | None]:
    if isinstance(summary, dict) and isinstance(summary.get("total_steps"), int) and holder(out) is None:
        return summary.get("steps"), summary["total_steps"]
    m = STEP_RE.findall(_last_session(out, 20_000))
    if m:
        return int(m[-1][0]), int(m[-1][1])
    return (int(recs[-1]["step"]) if recs else None), None


def first_visit(root: Path, p: Path, seen: set[Path]) -> bool:
    """Whether a folder walk should enter p: inside root once links are followed, and not seen before
    under another name (folder links out of the runs folder, or back up into it, are not walked)."""
    try:
        real = p.resolve()
    except OSError:  # a link loop
        return False
    if not real.is_relative_to(root.resolve()) or real in seen:
        return False
    seen.add(real)
    return True


def find(root: Path) -> list[Path]:
    """Run folders under root (root itself included), newest first; a run's own sub-folders
    (checkpoints, best, previous) are not runs of their own. A folder link that leads out of root
    is not followed (nothing outside the runs folder is listed), nor one back to a folder seen."""
    found: list[Path] = []
    seen: set[Path] = set()

    def walk(p: Path, depth: int) -> None:
        if not first_visit(root, p, seen):
            return
        if is_run(p):
            found.append(p)
            return
        if depth >= MAX_DEPTH:
            return
        try:
            kids = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".") and c.name not in NOT_RUNS)
        except OSError:
            return
        for c in kids:
            walk(c, depth + 1)

    walk(root, 0)
    return sorted(found, key=_mtime, reverse=True)


def _mtime(p: Path) -> float:
    try:
        return max((p / f).stat().st_mtime for f in ("metrics.jsonl", "train.log", "config.yaml", ".")
                   if (p / f).exists())
    except OSError:
        return 0.0


def name(root: Path, out: Path) -> str:
    rel = out.resolve().relative_to(root.resolve()).as_posix()
    return rel if rel != "." else "."


def row(root: Path, out: Path) -> dict[str, Any]:
    """One line of the runs table."""
    st, why = status(out)
    s = _json(out / "summary.json")
    s = s if isinstance(s, dict) else {}
    recs = metrics(out)
    step, total = progress(out, recs, s)
    last_loss = next((r["loss"] for r in reversed(recs) if isinstance(r.get("loss"), (int, float))), None)
    peak = s.get("peak_mem_mb") or max((r["peak_mem_mb"] for r in recs if isinstance(r.get("peak_mem_mb"), (int, float))),
                                       default=None)
    wall = s.get("total_wall_s") or s.get("wall_s")
    h = holder(out) if st == "running" else None
    if h is not None:  # a running session: the time since its process took the folder
        try:
            wall = time.time() - time.mktime(time.strptime(str(h.get("started")), "%Y-%m-%d %H:%M:%S"))
        except (ValueError, OverflowError):
            wall = None
    return {"name": name(root, out), "status": st, "why": why, "step": step, "total_steps": total,
            "metric": s.get("metric"), "best": s.get("best"), "best_step": s.get("best_step"),
            "before": (s.get("before") or {}).get(s.get("metric")) if isinstance(s.get("before"), dict) else None,
            "trainable_pct": s.get("trainable_pct"), "trainable": s.get("trainable"),
            "method": s.get("method"), "task": s.get("task"), "wall_s": wall,
            "train_time_s": s.get("train_time_s"), "peak_mem_mb": peak, "loss": last_loss,
            "checkpoints": len(checkpoints(out)), "mtime": _mtime(out)}


def detail(root: Path, out: Path) -> dict[str, Any]:
    """A run's page: its row, its curves, its report and the tail of its log."""
    d = row(root, out)
    d["records"] = metrics(out)
    try:
        d["report"] = (out / "report.md").read_text(errors="replace")[:200_000]
    except OSError:
        d["report"] = None
    d["log_tail"] = _last_session(out, 8_000)[-4_000:]
    try:
        d["config"] = (out / "config.yaml").read_text(errors="replace")[:50_000]
    except OSError:
        d["config"] = None
    return d
