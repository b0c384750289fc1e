"""The one place the command line turns an exception into what a person reads.

Every command runs through `run_command`:
  - the project's error types (a config key, a data file, a run folder, a target module, a
    checkpoint, ...) and the operating system's (a file that cannot be read or written) become one
    message on stderr and exit code 2;
  - anything else is a bug or a case nobody foresaw: one message saying what failed and where the
    traceback was written (the run's train.log, else a log file under $SLIMTUNE_CACHE/logs), exit 1;
  - `--debug` prints the traceback instead;
  - Ctrl-C: 130 (SIGTERM: 143) with what was kept: a training run says its checkpoint itself.
"""
from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from typing import Callable


class CommandError(Exception):
    """A command refusing what it was asked, with the reason and the fix in the message."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..targeting import TargetError
    from ..train.config import JobConfigError
    from ..train.datafiles import DataError
    from ..train.trainer import TrainingDiverged

    return (CommandError, JobConfigError, DataError, TrainingDiverged, ConfigError, CheckpointError, TargetError,
            FileNotFoundError)


def message(e: BaseException) -> str:
    """The text of an error without KeyError's quotes."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e)


_OS_HINTS = {errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
             errno.ENOSPC: "free some disk space (or point output_dir / $SLIMTUNE_CACHE elsewhere)",
             errno.EROFS: "the file system is read-only: choose another folder",
             errno.EISDIR: "it is a folder: give a file", errno.ENOTDIR: "a part of the path is a file, not a folder",
             errno.EEXIST: "something with that name is in the way", errno.EDQUOT: "the disk quota is full"}


def os_message(e: OSError) -> str:
    """An OSError as a sentence: what, which file, the fix."""
    what = e.strerror or type(e).__name__
    where = f" '{e.filename}'" + (f" -> '{e.filename2}'" if getattr(e, "filename2", None) else "") if e.filename else ""
    hint = _OS_HINTS.get(e.errno or 0)
    return f"{what}:{where}" + (f"; {hint}" if hint else "") if where else f"{what}" + (f"; {hint}" if hint else "")


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _crash_log(e: BaseException) -> str | None:
    """Where the traceback of an unexpected error is: the run's log, else a new file."""
    log = getattr(e, "slimtune_log", None)
    if log:
        return log
    from ..train.models import cache_dir

    for root in (cache_dir() / "logs", __import__("tempfile").gettempdir()):
        try:
            os.makedirs(root, exist_ok=True)
            path = os.path.join(str(root), f"slimtune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            with open(path, "w") as f:
                f.write(f"slimtune {' '.join(sys.argv[1:])}\n\n")
                f.write("".join(traceback.format_exception(e)))
            return path
        except OSError:
            continue
    return None


def run_command(fn: Callable[[], int | None], debug: bool = False) -> int:
    from ..train.interrupt import TrainingInterrupted

    try:
        return fn() or 0
    except TrainingInterrupted as e:
        print(f"{e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: stopped at once; nothing was saved by this command after its last checkpoint "
              "(a training run keeps the checkpoints in its output_dir: `slimtune train OUTPUT_DIR --resume`)",
              file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
            return 2
        if isinstance(e, _known_errors()):
            return fail(message(e))
        if isinstance(e, OSError):
            return fail(os_message(e))
        where = _crash_log(e)
        print(f"error: unexpected {type(e).__name__}: {message(e)[:500]}\n"
              f"this is a bug or a case slimtune does not handle yet; the traceback is in {where or '(no log written)'} "
              "(or rerun with --debug to print it)", file=sys.stderr)
        return 1
