"""`slimtune train [CONFIG|RUN] [key=value ...]`: the job, from a YAML file (none: the shipped default)."""
from __future__ import annotations

import os
import time
from pathlib import Path

HELP = "train an adapter from a YAML config (none: the shipped default run)"


def add_parser(sub) -> None:
    t = sub.add_parser("train", help=HELP,
                       description="Train an adapter. CONFIG is a YAML file (model, task, method, data, train, eval, "
                       "output_dir) or a run folder (its config.yaml: `slimtune train runs/x --resume`); key=value "
                       "pairs override it with dotted paths (train.lr=1e-4 method.r=16 data.max_train=500). Your own "
                       "data without a file: `slimtune train model=minilm data.train=my.csv` (docs/data.md). With "
                       "nothing: the offline default run (LoRA on SmolLM2-135M-Instruct, plot summary vs critic's "
                       "review on Rotten Tomatoes texts), printing the held-out metric before -> after.")
    t.add_argument("config", nargs="?", help="YAML config file or run folder")
    t.add_argument("overrides", nargs="*", help="key=value overrides (dotted paths)")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint "
                   "(the config must be the one it started with)")
    t.add_argument("--resume-weights-only", action="store_true",
                   help="with a changed config: start a new run from the latest checkpoint's trained weights (fresh "
                   "optimizer and schedule); the old run moves to output_dir/previous")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    t.add_argument("--output-dir", help="same as output_dir=...")
    t.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine: runs the same "
                   "command under torchrun (DDP, or FSDP with train.distributed=fsdp; docs/distributed.md)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar: the log prints the loss every "
                   "train.log_every steps")
    t.set_defaults(fn=run)


def _quoted(v: str) -> str:
    """A path as a YAML string whatever it contains (`runs/[a]` would read as a list)."""
    return "'" + v.replace("'", "''") + "'"


def _argv(a) -> list[str]:
    """This command's arguments again, less --nproc: what each of torchrun's processes runs."""
    out = ([a.config] if a.config else []) + list(a.overrides)
    flags = {"--resume": a.resume, "--resume-weights-only": a.resume_weights_only, "--overwrite": a.overwrite,
             "--no-progress": a.no_progress}
    out += [f for f, on in flags.items() if on]
    return out + (["--output-dir", a.output_dir] if a.output_dir else [])


def run(a) -> int:
    from ..train.config import load_config
    from ..train.run import run_train
    from .common import is_run_folder, not_a_run

    overrides = list(a.overrides)
    config = a.config
    if config and "=" in config and not Path(config).exists():  # `slimtune train key=value` (no file)
        overrides.insert(0, config)
        config = None
    if config and Path(config).is_dir():  # a run folder: its config, its folder
        if not is_run_folder(config):
            raise not_a_run(config, "a YAML config or a run folder")
        overrides.insert(0, f"output_dir={_quoted(config)}")
        config = str(Path(config) / "config.yaml")
    if a.resume or a.resume_weights_only:
        overrides.append("resume=true")
    if a.resume_weights_only:
        overrides.append("resume_weights_only=true")
    if a.overwrite:
        overrides.append("overwrite=true")
    if a.output_dir:
        overrides.append(f"output_dir={_quoted(a.output_dir)}")
    cfg = load_config(config, overrides)
    if a.nproc is not None and a.nproc != 1:
        from ..train.distributed import DistributedError
        from ..train.launch import spawn

        if a.nproc < 1:
            raise DistributedError(f"--nproc {a.nproc}: give a number of processes of 1 or more")
        return spawn(_argv(a), a.nproc, cfg)  # the config was checked here first: errors come once
    if config is None and cfg.data.builtin == "rotten_tomatoes_plot":
        print(f"no config given: running the shipped default (LoRA on SmolLM2-135M-Instruct: plot summary or "
              f"critic's review? on Rotten Tomatoes texts). `slimtune train --help` shows how to pass your own. Output: {cfg.output_dir}")
    t0 = time.time()
    run_train(cfg, progress=not a.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, from rank 0
        print(f"done in {time.time() - t0:.1f} s")
    return 0
