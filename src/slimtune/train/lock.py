"""The lock a run holds on its folder: an flock(2) on `OUTPUT_DIR/.slimtune.lock`, so the kernel drops
it when the process ends in any way (even SIGKILL); the pid, host, start time and command written
inside are for the message a second run prints. A lock file whose flock is free was left by a
process that died: it is taken over and said so. Without flock (Windows): O_EXCL and a pid check.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .config import JobConfigError

LOCK_NAME = ".slimtune.lock"


class RunFolderError(JobConfigError):
    """The output folder cannot be used as asked; the message says why and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def holder(info: dict[str, Any]) -> str:
    pid, host = info.get("pid"), info.get("host")
    here = host == socket.gethostname()
    state = ("" if not isinstance(pid, int) or not here else "" if _alive(pid) else " (not running)")
    where = f"pid {pid}{state}" + (f" on {host}" if host and not here else "")
    more = [f"started {info['started']}" if info.get("started") else "",
            f"`{info['command']}`" if info.get("command") else ""]
    return where + (f" ({', '.join(x for x in more if x)})" if any(more) else "")


class RunLock:
    """An exclusive lock on a run folder for the life of one process."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns what a dead previous holder wrote (None if there was none)."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): O_EXCL + pid check
            return self._acquire_excl()
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunFolderError(f"output_dir '{self.path.parent}' is not writable ({e.strerror}); choose a folder "
                                     "you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                info = _read_info(fd)
                os.close(fd)
                raise RunFolderError(
                    f"output_dir '{self.path.parent}' is in use by another slimtune run: {holder(info)}. Wait for it "
                    f"to finish (or stop it{': kill ' + str(info['pid']) if isinstance(info.get('pid'), int) else ''}), "
                    "or give this run another output_dir") from None
            try:  # the holder may have released (unlinked) the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            prev = _read_info(fd)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_me()).encode())
            self.fd = fd
            return prev or None
        raise RunFolderError(f"could not lock '{self.path}': it keeps changing; is another run starting there?")

    def _acquire_excl(self) -> dict[str, Any] | None:
        prev = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_info_path(self.path)
                pid = info.get("pid")
                if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                    prev = info
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunFolderError(f"output_dir '{self.path.parent}' is in use by another slimtune run: "
                                     f"{holder(info)}; wait for it, or give this run another output_dir") from None
            os.write(fd, json.dumps(_me()).encode())
            self.fd = fd
            return prev
        raise RunFolderError(f"could not lock '{self.path}'")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink while still holding it: see the inode check above
        finally:
            os.close(self.fd)
            self.fd = None


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join(["slimtune" if sys.argv[0].endswith(("slimtune", "__main__.py")) else
                                   Path(sys.argv[0]).name] + sys.argv[1:])[:300]}


def _read_info(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        info = json.loads(data.decode()) if data.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_info_path(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}
