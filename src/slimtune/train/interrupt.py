"""Ctrl-C and SIGTERM during training: the first asks the loop to stop after the current step
(it writes a checkpoint and the report, then raises `TrainingInterrupted`); the second stops at
once (KeyboardInterrupt), losing the steps since the last checkpoint.

Handlers are installed only from the main thread (signal handlers can live nowhere else) and the
previous ones come back on exit, so a notebook or a sweep calling `run_train` keeps its own.
"""
from __future__ import annotations

import os
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C / SIGTERM after saving; the message says what was kept and how to go on."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopRequest:
    """`with StopRequest() as stop: ... if stop.requested: save and leave`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, f"signal {self.signum}")

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: leave now
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another print to the same stream
        os.write(2, f"\n{NAMES.get(signum, 'signal')}: stopping after the current step; a checkpoint and the report "
                    f"are written first ({'Ctrl-C' if signum == signal.SIGINT else 'the same signal'} again quits at "
                    "once, losing the steps since the last checkpoint)\n".encode())

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # ignored by the parent (nohup, a script's & job): keep
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()


class SetupSignals:
    """Before the loop (loading, data, set-up) there is nothing to save: SIGTERM then stops at once
    like Ctrl-C does, as a KeyboardInterrupt that records which signal it was, so the folder's lock
    is released and the command says what happened instead of vanishing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        raise KeyboardInterrupt

    def __enter__(self) -> "SetupSignals":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None
