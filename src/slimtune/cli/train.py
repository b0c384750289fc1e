"""`slimtune train [CONFIG] [key=value ...]`: the job, from a YAML file (none: the shipped default)."""
from __future__ import annotations

import time
from pathlib import Path

HELP = "train an adapter from a YAML config (none: the shipped default run)"


def add_parser(sub) -> None:
    t = sub.add_parser("train", help=HELP,
                       description="Train an adapter. CONFIG is a YAML file (model, task, method, data, train, eval, "
                       "output_dir); key=value pairs override it with dotted paths (train.lr=1e-4 method.r=16 "
                       "data.max_train=500). With no CONFIG: the offline default run (LoRA on SmolLM2-135M-Instruct, "
                       "plot summary vs critic's review on Rotten Tomatoes texts), printing the held-out metric before -> after.")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides (dotted paths)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--output-dir", help="same as output_dir=...")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.set_defaults(fn=run)


def run(a) -> int:
    from ..train.config import load_config
    from ..train.run import run_train

    overrides = list(a.overrides)
    config = a.config
    if config and "=" in config and not Path(config).exists():  # `slimtune train key=value` (no file)
        overrides.insert(0, config)
        config = None
    if a.resume:
        overrides.append("resume=true")
    if a.output_dir:
        overrides.append(f"output_dir={a.output_dir}")
    cfg = load_config(config, overrides)
    if config is None:
        print(f"no config given: running the shipped default (LoRA on SmolLM2-135M-Instruct: plot summary or "
              f"critic's review? on Rotten Tomatoes texts). `slimtune train --help` shows how to pass your own. Output: {cfg.output_dir}")
    t0 = time.time()
    run_train(cfg, progress=not a.no_progress)
    print(f"done in {time.time() - t0:.1f} s")
    return 0
