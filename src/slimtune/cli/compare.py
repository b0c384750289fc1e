"""`slimtune compare [CONFIG] [key=value ...] --methods ...`: every method on one task, the same data, split,
steps and seed, each with a learning rate probed on validation; held-out numbers on a test split."""
from __future__ import annotations

from pathlib import Path

HELP = "train every method on one config (lr probed on validation) and tabulate test metric, size, time, memory"


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help=HELP,
                       description="Train each method on CONFIG with the same data, split, steps (or training-time "
                       "budget) and seed; each method's learning rate comes from a short probe on a log grid, chosen "
                       "on the validation split. The final numbers are measured once on a test split no run selected "
                       "on. Writes OUT/compare.md, compare.csv, compare.png and every run's folder under OUT/runs. "
                       "Running the same command again keeps the finished rows (docs/search.md).")
    c.add_argument("config", nargs="?", help="YAML config (none: the shipped default run)")
    c.add_argument("overrides", nargs="*", help="key=value overrides (dotted paths)")
    c.add_argument("--methods", default="all", help="comma-separated methods, or all (default), or none (the config "
                   "row alone: e.g. a search's best.yaml under the same budget)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="train.max_steps for every method (default: the config's schedule)")
    g.add_argument("--budget-minutes", type=float, help="training time per method instead of a step count")
    c.add_argument("--budget-clock", default="auto", choices=["auto", "cpu", "wall"],
                   help="the clock of --budget-minutes: cpu (the process's CPU seconds per step over its threads: the "
                   "same compute on a busy shared machine), wall, or auto (default: cpu on CPU, wall on a GPU)")
    c.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="a learning rate for a method (no probe for it); repeat or comma-separate: --lr full=1e-5,ia3=3e-3")
    c.add_argument("--no-probe", action="store_true", help="no lr probe: each method's default learning rate")
    c.add_argument("--lr-grid", type=int, default=3, help="learning rates in the probe, half a decade apart (default 3)")
    c.add_argument("--probe-steps", type=int, help="steps of each probe run (default: a quarter of the run, at least 10)")
    c.add_argument("--test-fraction", type=float, help="the test split to carve when the config has none (default 0.1)")
    c.add_argument("--no-config-row", action="store_true", help="leave out the row of the config as given")
    c.add_argument("--seeds", type=int, default=1, help="train each row's chosen config under this many training "
                   "seeds (same splits) and give the test mean and spread (default 1)")
    c.add_argument("--rerun", action="store_true", help="run every row again, even those finished in OUT")
    c.add_argument("--out", help="output folder (default: OUTPUT_DIR-compare)")
    c.set_defaults(fn=run)


def parse_lrs(items: list[str]) -> dict[str, float]:
    from .errors import CommandError

    out: dict[str, float] = {}
    for item in items:
        for part in filter(None, (x.strip() for x in item.split(","))):
            name, eq, val = part.partition("=")
            try:
                if not eq:
                    raise ValueError
                out[name.strip()] = float(val)
            except ValueError:
                raise CommandError(f"--lr {part!r}: write METHOD=LR, e.g. --lr full=1e-5") from None
            if out[name.strip()] <= 0:
                raise CommandError(f"--lr {part!r}: a learning rate must be above 0")
    return out


def config_and_overrides(config: str | None, overrides: list[str]):
    """(config path or None, overrides): `slimtune compare key=value` works without a file, as train does."""
    overrides = list(overrides)
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    return config, overrides


def run(a) -> int:
    from ..search.compare import CompareOptions, run_compare
    from ..train.config import load_config

    config, overrides = config_and_overrides(a.config, a.overrides)
    cfg = load_config(config, overrides)
    opts = CompareOptions(out=Path(a.out or f"{cfg.output_dir}-compare"), methods=[m.strip() for m in a.methods.split(",")
                                                                                  if m.strip()],
                          steps=a.steps, budget_min=a.budget_minutes, lrs=parse_lrs(a.lr), probe=not a.no_probe,
                          grid=a.lr_grid, probe_steps=a.probe_steps, test_fraction=a.test_fraction,
                          as_given=not a.no_config_row, rerun=a.rerun, seeds=a.seeds, clock=a.budget_clock)
    run_compare(cfg, opts)
    return 0
