"""Choosing the method and its settings from measurements: `slimtune compare` and `slimtune search`.

    space.py     the `search:` YAML section, defaults per task and method, a trial's draw
    targets.py   target sets by role (attention / MLP / all-linear) and layer subsets, found structurally
    prepare.py   what is known before any run (data + test split, metric, blocks, trainable counts,
                 timing) and the one measurement on the test split at the end
    compare.py   every method on the same data / steps / seed; worker.py runs one row in its own process
                 (lr probe on validation, the run, the test split)
    study.py     the Optuna study session: TPE, successive halving / Hyperband at evaluation rungs,
                 Pareto, the storage (storage.py; pool.py starts local workers), resume after a kill
    trial.py     one trial: ask, run (a retry continues the earlier run from its checkpoint), tell
    seeds.py     how sure the best is: the top configs under other training seeds, the pick by the mean
    report.py    compare.md / .csv / .png, search.md / .csv / plots, best.yaml

Both reuse the job unchanged (`train.run.run_train` per run; the trainer's `on_evaluate` callback
is the pruning hook). docs/search.md is the user guide.
"""
