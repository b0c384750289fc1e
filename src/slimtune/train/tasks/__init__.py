"""The one list of tasks: name -> `Task` (what the job loads, reads, measures and predicts for it).

Each module in this package holds one task and registers it with `@register_task`; the pipeline
(job.py, data.py, evaluate.py, run.py, the CLI) asks the task and never branches on its name:

    spec = get_task(cfg.task)                        # KeyError naming the closest task
    tok = spec.load_processor(cfg, path)             # tokenizer, image processor, ...
    model = spec.load_model(cfg, path, num_labels, dtype, quant_kwargs)
    spec.measured_metrics(evaluation)                # what evaluation reports
    spec = task_for_model(path)                      # `task: auto` from the model, when it decides
    spec = task_for_format(fmt)                      # `task: auto` from the data format otherwise

How to add a task: docs/ARCHITECTURE.md ("Adding a task").
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from .base import Task, load_tokenizer

_REGISTRY: dict[str, Task] = {}
_loaded = False


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: one instance of the task class is the registry's entry under `cls.name`."""
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def all_tasks() -> dict[str, Task]:
    _load_all()
    return dict(_REGISTRY)


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name in tasks:
        return tasks[name]
    close = difflib.get_close_matches(str(name), sorted(tasks), n=1)
    raise KeyError(f"unknown task {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                   + f" (tasks: {', '.join(sorted(tasks))})")


def task_for_format(fmt: str | None) -> Task:
    """The task a data format implies under `task: auto` (text data: causal LM, its fallback)."""
    tasks = all_tasks()
    return next((t for t in tasks.values() if fmt in t.formats), tasks["causal_lm"])


def hf_config(path: str | None):
    """The model folder's transformers config, or None (no folder, or not a transformers model)."""
    if not path:
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        return None


def task_for_model(model_name: str, path: str | None) -> Task | None:
    """The task the model alone decides (an image classifier, the digits CNN), else None: text
    models serve several tasks and the data chooses among them."""
    hf_cfg = hf_config(path)
    return next((t for t in all_tasks().values() if t.owns_model(model_name, hf_cfg)), None)


def torch_models() -> set[str]:
    """Model names the tasks build themselves (no transformers folder to resolve)."""
    from .cnn import CNN_MODELS

    return {"digits-cnn", *CNN_MODELS}


def task_for_adapter(task_type: str | None, path: str) -> Task:
    """The task of a saved adapter: its PEFT task_type, else what its base model is."""
    tasks = all_tasks()
    by_type = next((t for t in tasks.values() if task_type and t.peft_task_type == task_type), None)
    if by_type is not None:
        return by_type
    return task_for_model(path, path) or tasks["causal_lm"]


__all__ = ["Task", "load_tokenizer", "hf_config", "register_task", "get_task", "all_tasks", "task_for_format", "task_for_model", "task_for_adapter",
           "torch_models"]
