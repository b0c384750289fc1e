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
    """Where the traceback of an unexpected error is: the run's log, else a new file. Never raises:
    text that cannot be encoded (a surrogate from a non-UTF-8 argument) is written escaped, and a
    failure of the logger itself (a broken exception, an unusable cache folder) gives None."""
    try:
        log = getattr(e, "slimtune_log", None)
        if isinstance(log, str) and log:
            return log
        from ..train.models import cache_dir

        roots = [str(cache_dir() / "logs"), __import__("tempfile").gettempdir()]
    except Exception:  # noqa: BLE001 - the crash logger must not crash
        roots = [__import__("tempfile").gettempdir()]
    for root in roots:
        try:
            os.makedirs(root, exist_ok=True)
            path = os.path.join(root, f"slimtune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"slimtune {' '.join(map(str, sys.argv[1:]))}\n\n")
                try:
                    f.write("".join(traceback.format_exception(e)))
                except Exception as inner:  # noqa: BLE001 - e.g. an exception whose __str__ raises
                    f.write(f"{type(e).__name__} (its traceback could not be formatted: {type(inner).__name__})\n")
            return path
        except Exception:  # noqa: BLE001 - OSError, or anything else: try the next folder
            continue
    return None


def _safe_text(e: BaseException) -> str:
    """message(e) for printing: never raises, surrogates escaped so any terminal can show it."""
    try:
        text = message(e)
    except Exception:  # noqa: BLE001 - an exception whose __str__ itself fails
        text = "(no message)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_argv_text(argv: list[str]) -> str | None:
    """A command-line argument that is not valid text in the locale's encoding (Python keeps such
    bytes as lone surrogates, which every tokenizer and file write refuses): the message naming it
    and the fix, or None when every argument is text."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as err:
            shown = arg.encode("utf-8", "backslashreplace").decode("utf-8")
            code = ord(arg[err.start])
            byte = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
            return (f"argument {i + 1} ('{shown[:60]}') is not valid UTF-8 text ({byte} at character "
                    f"{err.start + 1}); pass UTF-8 text: convert it first (e.g. `iconv -f latin1 -t utf-8`), rename a "
                    "file whose name is not UTF-8, or use a UTF-8 locale (LANG=C.UTF-8)")
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
        # CommandError first: _known_errors imports the job's modules (torch), seconds a refusal
        # made before any of them loaded (a busy port, a bad argument) need not wait for
        if isinstance(e, CommandError) or isinstance(e, _known_errors()):
            return fail(_safe_text(e))
        if isinstance(e, OSError):
            return fail(os_message(e))
        where = _crash_log(e)
        print(f"error: unexpected {type(e).__name__}: {_safe_text(e)[:500]}\n"
              f"this is a bug or a case slimtune does not handle yet; the traceback is in {where or '(no log written)'} "
              "(or rerun with --debug to print it)", file=sys.stderr)
        return 1
