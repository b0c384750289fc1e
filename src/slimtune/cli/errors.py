"""The one place the command line turns an exception into what a person reads.

Every command runs through `run_command`: the project's error types (a wrong config key, a data
file, a target module, a checkpoint, ...) become one line on stderr and exit code 2; `--debug`
shows the traceback instead. Ctrl-C exits with 130.
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable


class CommandError(Exception):
    """A command refusing what it was asked, with the reason and the fix in the message."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..targeting import TargetError
    from ..train.config import JobConfigError
    from ..train.data import DataError
    from ..train.trainer import TrainingDiverged

    return (CommandError, JobConfigError, DataError, TrainingDiverged, ConfigError, CheckpointError, TargetError,
            FileNotFoundError)


def message(e: BaseException) -> str:
    """The text of an error without KeyError's quotes."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_command(fn: Callable[[], int | None], debug: bool = False) -> int:
    try:
        return fn() or 0
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; `slimtune train ... --resume` continues", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
            return 2
        if isinstance(e, _known_errors()) or isinstance(e, KeyError):  # KeyError: unknown method / metric
            return fail(message(e))
        raise
