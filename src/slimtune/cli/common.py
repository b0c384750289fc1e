"""What several commands share: quiet transformers logging, telling a run folder from a config or an
adapter folder, loading a base model for an adapter folder."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CommandError


def quiet_hf() -> None:
    """transformers' progress bars and info banners off: the commands print their own lines."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


def is_run_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.yaml").is_file()


def not_a_run(path: str | Path, what: str = "a run folder") -> CommandError:
    p = Path(path)
    inside = sorted(x.name for x in p.iterdir())[:6] if p.is_dir() else []
    return CommandError(f"'{path}' is a folder but not a slimtune run (no config.yaml"
                        + (f"; it holds {', '.join(inside)}" if inside else "; it is empty")
                        + f"); pass {what}: the output_dir of `slimtune train`")


def run_dir_config(target: str | None, overrides: list[str]):
    """(config, adapter folder) for a run folder (its config.yaml and best adapter), or (config, None)
    for a YAML file / the default config."""
    from ..train.config import load_config

    if target and Path(target).is_dir():
        if not is_run_folder(target):
            raise not_a_run(target, "a run folder or a YAML config")
        cfg = load_config(str(Path(target) / "config.yaml"), overrides)
        return cfg, adapter_folder(target)
    return load_config(target, overrides), None


def adapter_folder(path: str) -> str:
    """An adapter folder from what a person passes: the folder itself, or a run folder (its best/,
    else its last adapter/)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return str(p)
    if is_run_folder(p):
        for sub in ("best", "adapter"):
            if (p / sub / "adapter_config.json").is_file():
                return str(p / sub)
        raise CommandError(f"run folder '{path}' has no trained adapter yet (no best/ or adapter/): the run stopped "
                           f"before its first evaluation; resume it (`slimtune train {path} --resume`) or pass a "
                           "checkpoint's adapter (checkpoints/step-*/adapter)")
    if not p.exists():
        raise CommandError(f"adapter folder '{path}' does not exist")
    if not p.is_dir():
        raise CommandError(f"'{path}' is a file; pass an adapter folder (with adapter_config.json) or a run folder")
    raise CommandError(f"no adapter_config.json in '{path}': pass the folder `train` wrote (runs/NAME, runs/NAME/best "
                       "or runs/NAME/adapter)")


def load_base(model_name: str | None, adapter: str | None, task: str | None = None, load_kwargs: dict | None = None):
    """(base model, tokenizer, its folder, PEFT task type) for an adapter folder: --model if given,
    else the adapter's base_model_name_or_path when that folder is on this machine. `load_kwargs`
    go to from_pretrained (e.g. a quantization_config, slimtune.quant)."""
    from ..train import models
    from ..train.tasks import task_for_adapter, torch_models

    cfgj = {}
    if adapter:
        adapter = adapter_folder(adapter)
        try:
            cfgj = json.loads((Path(adapter) / "adapter_config.json").read_text())
        except ValueError as e:
            raise CommandError(f"{adapter}/adapter_config.json is not valid JSON ({e})") from None
    base = cfgj.get("base_model_name_or_path")
    if (model_name or base) in torch_models():  # a CNN the image task builds by name (train/tasks/cnn.py)
        path = model_name or base
    elif model_name:
        path = models.resolve(model_name)
    elif base and base in models.HUB_IDS.values():  # a packaged model, named by its Hub id
        path = models.resolve(base)
    elif base and Path(base).exists():
        path = base
    else:
        raise CommandError("which base model? pass --model (a builtin name or folder); the adapter's "
                           f"base_model_name_or_path ({cfgj.get('base_model_name_or_path')!r}) is missing or not on "
                           "this machine")
    task = task or cfgj.get("task_type")
    spec = task_for_adapter(task, path)  # the task's model class and processor (train/tasks/)
    model, tok = spec.load_for_adapter(path, adapter, load_kwargs)
    task = task or spec.peft_task_type or spec.name
    if load_kwargs:  # a quantized base: no bitsandbytes CPU repack before the first eval forward (quant/prepare.py)
        from ..quant import guard_cpu_repack

        guard_cpu_repack(model)
    return model, tok, path, task
