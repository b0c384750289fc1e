"""A run owns its output folder, from the first line of set-up to its last write.

    claim(cfg) -> Claim     lock the folder (pid + host in `.slimtune.lock`, released on any exit;
                            a lock whose process died is detected and taken over), then decide what
                            the folder's contents mean for this run:
        empty / new                          start
        a run, no flag                       refuse: --resume, --overwrite or another output_dir
        a run that saved nothing yet         replaced (nothing to lose), said so
        resume, same config                  continue from its latest checkpoint
        resume, other config                 refuse naming the keys; --resume-weights-only moves
                                             the old run to previous/ and starts from its weights
        overwrite                            the old run's files are removed
    and clear what a killed process left: unfinished `.tmp-*` checkpoint folders, a half-deleted
    checkpoint, a best/ adapter caught between two renames.

The lock: lock.py.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import RUN_CONTROL, JobConfig, saved_form, yaml_load
from .lock import LOCK_NAME, RunFolderError, RunLock, holder  # noqa: F401 - LOCK_NAME: the folder's API
# what makes a folder a run; the other files a run writes come after
MARKERS = ("config.yaml", "checkpoints", "adapter", "best", "metrics.jsonl", "report.md", "summary.json")
RUN_FILES = MARKERS + ("metrics.csv", "plot.png", "tensorboard", "train.log")
# keys a resumed run may change: they do not touch what is trained or how
RESUME_FREE = {"output_dir", "train.cpu_threads", "train.log_every", "train.report_to", "eval.batch_size", *RUN_CONTROL,
               "train.distributed", "train.distributed_timeout"}  # how many processes, and how, is free too
CHECKPOINT_FILES = ("trainer_state.pt", "trainable.safetensors")


# ---- what is in the folder -------------------------------------------------------------------------

def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder a killed prune half-deleted does not count)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return [c for c in sorted(root.glob("step-*")) if c.is_dir() and all((c / f).is_file() for f in CHECKPOINT_FILES)]


def is_run(out: Path) -> bool:
    return out.is_dir() and any((out / m).exists() for m in MARKERS)


def describe(out: Path) -> str:
    """One phrase for the run in a folder: how far it got and how it ended."""
    cks = checkpoints(out)
    last = f"last checkpoint at step {int(cks[-1].name.split('-')[1])}" if cks else "no checkpoint"
    try:
        s = json.loads((out / "summary.json").read_text())
        status = s.get("status", "finished")
        return f"{status} at step {s.get('steps')} of {s.get('total_steps', '?')}, {last}"
    except (OSError, ValueError, AttributeError):
        return f"{last}; it ended without a summary (killed?)"


def _valuable(out: Path) -> bool:
    return bool(checkpoints(out)) or (out / "best").is_dir() or (out / "adapter").is_dir()


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _norm(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    m = d.get("method", "lora")
    d["method"] = {"name": m} if isinstance(m, str) else {"name": "lora", **m} if isinstance(m, dict) else m
    return flat(d)


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting a resumed run would change."""
    a, b = _norm(saved), _norm(current)
    lines = []
    for k in sorted(set(a) | set(b)):
        if k in RESUME_FREE or k.split(".")[0] in RESUME_FREE:
            continue
        va, vb = a.get(k, "(not set)"), b.get(k, "(not set)")
        if va != vb:
            lines.append(f"{k}: {va!r} -> {vb!r}")
    return lines


def saved_config(ck: Path | None, out: Path) -> dict[str, Any] | None:
    for p in ([ck / "config.yaml"] if ck else []) + [out / "config.yaml"]:
        if p.is_file():
            try:
                d = yaml_load(p.read_text())
                return d if isinstance(d, dict) else None
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                return None
    return None


def write_config(cfg: JobConfig, path: Path) -> None:
    """config.yaml, written whole or not at all (a kill mid-write must not leave half a config)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(saved_form(cfg), sort_keys=False))
    os.replace(tmp, path)


# ---- claiming the folder ---------------------------------------------------------------------------

@dataclass
class Claim:
    out: Path
    lock: RunLock
    resume_from: Path | None = None  # a checkpoint: continue exactly where it stopped
    init_from: Path | None = None  # a checkpoint: its trained weights only (--resume-weights-only)
    notes: list[str] = field(default_factory=list)
    archive: bool = False  # weights-only: move the old run to previous/ once its weights are loaded

    def release(self) -> None:
        self.lock.release()

    def commit(self) -> str | None:
        """Weights-only: the weights are in the model, so the old run can move to previous/ now
        (not before: a checkpoint that does not fit must leave the folder as it was)."""
        if not self.archive:
            return None
        self.archive = False
        dest = _archive(self.out, keep=("train.log",))  # the log is open: both runs share it, one after the other
        if self.init_from is not None and self.init_from.resolve().is_relative_to(self.out.resolve()):
            self.init_from = dest / self.init_from.resolve().relative_to(self.out.resolve())
        return f"resume-weights-only: the earlier run in '{self.out}' moved to {dest}"

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(cfg: JobConfig, log: Callable[[str], None] = print) -> Claim:
    """Lock cfg.output_dir for this run and settle what its contents mean (see the module doc)."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir '{out}' is a file, not a folder; choose another output_dir")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunFolderError(f"cannot create output_dir '{out}': '{blocker}' is a file, not a folder; choose another "
                             "output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create output_dir '{out}': {e.strerror}; choose a folder you can write "
                             "to") from None
    lock = RunLock(out)
    prev = lock.acquire()
    c = Claim(out, lock)
    try:
        if prev:
            c.notes.append(f"took over the lock of an earlier run ({holder(prev)}) that ended without releasing it")
        _recover(out, c.notes)
        _decide(cfg, out, c)
    except BaseException:
        lock.release()
        raise
    for n in c.notes:
        log(n)
    return c


def _decide(cfg: JobConfig, out: Path, c: Claim) -> None:
    run = is_run(out)
    hint = ("add --resume to continue it, --overwrite to replace it, or choose another output_dir")
    if cfg.resume:
        ck = _resume_point(cfg, out)
        if ck is None:
            if run:
                _clear(out, c.notes, f"resume: '{out}' holds a run with no checkpoint to continue ({describe(out)}); "
                       "starting from step 0", keep=_valuable(out))
            else:
                c.notes.append(f"resume: no run in '{out}' yet; starting from step 0")
            return
        saved = saved_config(ck, out)
        current = yaml_load(yaml.safe_dump(saved_form(cfg), sort_keys=False))
        diff = config_diff(saved, current) if saved is not None else ["(the run's config.yaml is missing or unreadable)"]
        inside = ck.resolve().is_relative_to(out.resolve())
        if not inside and run:
            if cfg.overwrite:
                _clear(out, c.notes, f"overwrite: removed the earlier run in '{out}' ({describe(out)})", keep=False)
                run = False
            elif _valuable(out):
                raise RunFolderError(f"resume: checkpoint '{ck}' is from another folder, and output_dir '{out}' "
                                     f"already holds a run ({describe(out)}); resume into an empty output_dir, or add "
                                     "--overwrite")
        if cfg.resume_weights_only:
            c.init_from, c.archive = ck, run
            c.notes.append(f"resume-weights-only: starting at step 0 from the trained weights of {ck}")
            return
        if diff:
            raise RunFolderError(
                f"resume: the config differs from the one the run in '{out}' was started with: {'; '.join(diff)}. "
                "A checkpoint continues only the run it came from. To keep its trained weights and go on under the "
                "new settings (fresh optimizer and schedule), add --resume-weights-only; to start over, choose a "
                "fresh output_dir (or --overwrite)")
        c.resume_from = ck
        return
    if cfg.resume_weights_only:
        raise RunFolderError("--resume-weights-only needs --resume (resume: true): it takes the weights of the run "
                             f"in '{out}'")
    if not run:
        return
    if cfg.overwrite:
        _clear(out, c.notes, f"overwrite: removed the earlier run in '{out}' ({describe(out)})", keep=False)
    elif _valuable(out):
        raise RunFolderError(f"output_dir '{out}' already holds a run ({describe(out)}); {hint}")
    else:
        _clear(out, c.notes, f"replaced an earlier run in '{out}' that stopped before saving anything", keep=False)


def _resume_point(cfg: JobConfig, out: Path) -> Path | None:
    if isinstance(cfg.resume, str):
        ck = Path(cfg.resume).expanduser()
        if not ck.is_dir():
            raise RunFolderError(f"resume: checkpoint folder '{ck}' does not exist; use resume: true for the latest "
                                 f"checkpoint in output_dir, or one of {out}/checkpoints/step-*")
        if not all((ck / f).is_file() for f in CHECKPOINT_FILES):
            raise RunFolderError(f"resume: '{ck}' is not a slimtune checkpoint (no {' / '.join(CHECKPOINT_FILES)}); "
                                 f"pass a folder like {out}/checkpoints/step-000100, or resume: true")
        return ck
    cks = checkpoints(out)
    return cks[-1] if cks else None


def _clear(out: Path, notes: list[str], note: str, keep: bool) -> None:
    if keep:
        dest = _archive(out)
        notes.append(note + f"; its files moved to {dest}")
        return
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    notes.append(note)


def _archive(out: Path, keep: tuple[str, ...] = ()) -> Path:
    """Move a run's files into out/previous (previous-2, ... when taken): nothing is deleted."""
    n = 1
    while (out / ("previous" if n == 1 else f"previous-{n}")).exists():
        n += 1
    dest = out / ("previous" if n == 1 else f"previous-{n}")
    dest.mkdir()
    for name in RUN_FILES:
        if (out / name).exists() and name not in keep:
            os.replace(out / name, dest / name)
    return dest


def _recover(out: Path, notes: list[str]) -> None:
    """Undo what a killed process left half done (we hold the lock: nobody else writes here)."""
    gone = []
    for pat, where in ((".tmp-step-*", out / "checkpoints"), (".tmp-old-step-*", out / "checkpoints"),
                       (".tmp-best-*", out)):
        for p in sorted(where.glob(pat)) if where.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    asides = sorted(out.glob(".tmp-old-best-*"))
    if asides and not (out / "best").exists():  # killed between moving the old best aside and the new one in
        os.replace(asides[-1], out / "best")
        notes.append("restored best/ from the earlier best adapter a killed save had moved aside")
        asides = asides[:-1]
    for p in asides:
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    root = out / "checkpoints"
    complete = set(checkpoints(out))
    for p in sorted(root.glob("step-*")) if root.is_dir() else []:
        if p not in complete:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(f"{p.name} (incomplete)")
    if gone:
        notes.append(f"removed {len(gone)} unfinished checkpoint folder(s) a killed run left: {', '.join(gone[:4])}"
                     + (" ..." if len(gone) > 4 else ""))
