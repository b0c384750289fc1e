"""`slimtune search [CONFIG] [key=value ...] --trials N`: an Optuna study over method, rank, alpha,
learning rate, targets, layers and dropout; resumable from OUT/study.db."""
from __future__ import annotations

from pathlib import Path

HELP = "search method and settings with Optuna (TPE, pruning at evaluation rungs, Pareto), resumable"


def add_parser(sub) -> None:
    s = sub.add_parser("search", help=HELP,
                       description="Search the method and its settings for CONFIG with Optuna: TPE sampling over the "
                       "space of the config's search: section (defaults per task: docs/search.md), trials pruned at "
                       "evaluation rungs by successive halving, or a Pareto front of metric and trainable parameters. "
                       "Trials are selected on the validation split; the best is measured once on a test split. The "
                       "study is OUT/study.db: the same command again continues a stopped search. Writes OUT/search.md, "
                       "search.csv, best.yaml (`slimtune train OUT/best.yaml` reruns the best) and OUT/plots.")
    s.add_argument("config", nargs="?", help="YAML config (none: the shipped default run)")
    s.add_argument("overrides", nargs="*", help="key=value overrides (dotted paths)")
    s.add_argument("--trials", type=int, default=20, help="trials to finish, over all sessions (default 20)")
    s.add_argument("--timeout", type=float, metavar="MIN", help="time budget in minutes, over all sessions: no trial "
                   "starts that would not fit")
    s.add_argument("--budget-minutes", type=float, metavar="MIN", help="training time per trial instead of the config's "
                   "steps: each trial trains MIN minutes at its own step time (a slower config gets fewer steps) and "
                   "the pruner's rungs are clock time, so trials are ranked at equal time")
    s.add_argument("--budget-clock", default="auto", choices=["auto", "cpu", "wall"],
                   help="the clock of --budget-minutes: cpu (the process's CPU seconds per step over its threads: the "
                   "same compute on a busy shared machine), wall, or auto (default: cpu on CPU, wall on a GPU)")
    s.add_argument("--objective", help="the metric to optimise (default: search.metric, train.metric or the task's), "
                   "or pareto: the metric and trainable parameters together")
    s.add_argument("--pareto-with", default="params", choices=["params", "step_time"],
                   help="the second objective of --objective pareto (default params: trainable %%)")
    s.add_argument("--max-trainable-pct", type=float, help="skip configs above this trainable %% (before they train)")
    s.add_argument("--test-fraction", type=float, help="the test split to carve when the config has none (default 0.1)")
    s.add_argument("--keep-all", action="store_true", help="keep pruned and failed trials' folders and all checkpoints")
    s.add_argument("--overwrite", action="store_true", help="start over: remove the study and trials in OUT")
    s.add_argument("--out", help="output folder (default: OUTPUT_DIR-search)")
    s.add_argument("--storage", metavar="URL", help="the study's store, shared by every worker: postgresql://USER:PW@HOST:"
                   "PORT/DB, journal:PATH (a file in a shared folder) or sqlite:///PATH (default OUT/study.db); workers "
                   "on other machines run the same command with the same URL")
    s.add_argument("--workers", type=int, default=1, help="worker processes on this machine, this one included "
                   "(default 1)")
    s.add_argument("--seeds", type=int, default=3, help="how sure the best is: the top configs run again under this "
                   "many training seeds (same splits), the pick is the best mean, its test split measured per seed "
                   "(default 3; 1: no spread)")
    s.add_argument("--seed-top", type=int, default=3, metavar="K", help="how many of the best configs --seeds reruns "
                   "(default 3)")
    s.add_argument("--study", default="slimtune-search", help="the study's name in --storage (default slimtune-search)")
    s.add_argument("--heartbeat", type=int, default=10, metavar="S", help="with several workers, each running trial "
                   "beats every S seconds; one silent for 3 beats is failed and run again (default 10)")
    s.set_defaults(fn=run)


def run(a) -> int:
    from ..search.study import SearchOptions, run_search
    from ..train.config import load_config
    from .compare import config_and_overrides

    config, overrides = config_and_overrides(a.config, a.overrides)
    cfg = load_config(config, overrides)
    opts = SearchOptions(out=Path(a.out or f"{cfg.output_dir}-search"), trials=a.trials, timeout_min=a.timeout,
                         objective=a.objective, pareto_with=a.pareto_with, max_trainable_pct=a.max_trainable_pct,
                         keep_all=a.keep_all, test_fraction=a.test_fraction, overwrite=a.overwrite,
                         storage=a.storage, workers=a.workers, study=a.study, heartbeat_s=a.heartbeat,
                         seeds=a.seeds, top=a.seed_top, budget_min=a.budget_minutes, clock=a.budget_clock)
    run_search(cfg, opts)
    return 0
