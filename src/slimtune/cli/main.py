"""`slimtune` command line: one small module per command in this package; this file only builds
the parser from them and dispatches.

    slimtune train                                  # the shipped default run (offline, minutes on 2 CPU cores)
    slimtune train examples/minilm_rotten_tomatoes.yaml train.lr=1e-4 method.r=16
    slimtune eval runs/default                      # a run folder: its config + best adapter
    slimtune predict runs/minilm_rt new.csv --out pred.csv    # label + probability per row (or generated text)
    slimtune generate --adapter runs/default/best --system "" "Text: A clumsy, overlong mess.
    Is this text a movie's plot summary or a critic's review? Answer plot or review."
    slimtune merge --adapter runs/default/best --out merged/
    slimtune inspect smollm2-135m --method lora --task causal_lm
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # slimtune never downloads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The commands, in the order `slimtune --help` lists them: each a module of this package with
# `add_parser(subparsers)` (which sets `fn=run` on its parser) and `run(args) -> int`.
COMMANDS = ["train", "eval", "predict", "generate", "merge", "inspect", "export", "compare", "search", "serve", "ui"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimtune", description="Parameter-efficient fine-tuning: train, evaluate, "
                                "predict, generate, merge and inspect, offline.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 3)[3])
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its one-line message")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"slimtune.cli.{name}").add_parser(sub)
    sub.add_parser("bench", help="slimtune vs HF PEFT side by side: ms/step, memory, ratios (see `slimtune bench -h`)",
                   add_help=False)  # its own parser: slimtune.bench.main
    return p


def _term_as_interrupt():
    """SIGTERM before a command has its own handling stops like Ctrl-C: one message, not a silent
    exit. Returns the handler to put back."""
    import signal
    import threading

    def handle(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        return signal.signal(signal.SIGTERM, handle)
    return None


ANSWER_CTRL_C_ENV = "SLIMTUNE_ANSWER_CTRL_C"


def answer_ctrl_c() -> None:
    """A process started by a controller whose Stop is this process's Ctrl-C (`slimtune ui` starting a
    run: env SLIMTUNE_ANSWER_CTRL_C=1) takes SIGINT even where it inherited it ignored: a UI started
    under nohup or as a script's `&` job passes SIG_IGN on through exec, and the job deliberately keeps
    an ignored SIGINT, so Stop would do nothing. Read once, then dropped from the environment so the
    run's own children (torchrun workers, compare rows) keep the usual rule."""
    import signal
    import threading

    if os.environ.pop(ANSWER_CTRL_C_ENV, None) == "1" and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    import signal

    answer_ctrl_c()
    old = _term_as_interrupt()
    try:
        return _main(argv)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main(argv: list[str] | None) -> int:
    from .errors import check_argv_text, fail, run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    if (bad_text := check_argv_text(argv)) is not None:  # before a tokenizer or a file write meets it
        return fail(bad_text)
    debug = "--debug" in argv  # anywhere on the line: `slimtune train cfg.yaml --debug`
    argv = [x for x in argv if x != "--debug"]
    if argv[:1] == ["bench"]:
        from ..bench import main as bench_main

        return run_command(lambda: bench_main(argv[1:]), debug)
    p = build_parser()
    a, extra = p.parse_known_args(argv)
    # key=value overrides may come after options (`train cfg.yaml --no-progress train.lr=1e-4`)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(a, "overrides")]
    if bad:
        x = bad[0]
        return fail(f"unknown option {x}; `slimtune {a.cmd or ''} --help` lists them".replace("  ", " ")
                    if x.startswith("-") else
                    f"'{x}' is neither an option nor a key=value override (e.g. train.lr=1e-4)"
                    if hasattr(a, "overrides") else f"unexpected argument '{x}'; `slimtune {a.cmd} --help` shows the usage")
    if extra:
        a.overrides = list(a.overrides) + extra
    if not getattr(a, "cmd", None):
        p.print_help()
        return 0
    return run_command(lambda: a.fn(a), debug)


if __name__ == "__main__":
    sys.exit(main())
