"""What several commands share: quiet transformers logging, loading a base model for an adapter
folder, reading a run folder's config."""
from __future__ import annotations

import json
from pathlib import Path


def quiet_hf() -> None:
    """transformers' progress bars and info banners off: the commands print their own lines."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


def run_dir_config(target: str | None, overrides: list[str]):
    """(config, adapter folder) for a run folder (its config.yaml and best adapter), or (config, None)
    for a YAML file / the default config."""
    from ..train.config import load_config

    if target and Path(target).is_dir() and (Path(target) / "config.yaml").is_file():
        cfg = load_config(str(Path(target) / "config.yaml"), overrides + ["resume=false"])
        best = Path(target) / "best"
        return cfg, str(best if best.is_dir() else Path(target) / "adapter")
    return load_config(target, overrides), None


def load_base(model_name: str | None, adapter: str | None, task: str | None = None, load_kwargs: dict | None = None):
    """(base model, tokenizer, its folder, PEFT task type) for an adapter folder: --model if given,
    else the adapter's base_model_name_or_path when that folder is on this machine. `load_kwargs`
    go to from_pretrained (e.g. a quantization_config, slimtune.quant)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..train import models

    cfgj = {}
    if adapter:
        p = Path(adapter) / "adapter_config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no adapter_config.json in '{adapter}': pass the folder `train` wrote "
                                    "(runs/NAME/best or runs/NAME/adapter)")
        cfgj = json.loads(p.read_text())
    if model_name:
        path = models.resolve(model_name)
    elif cfgj.get("base_model_name_or_path") and Path(cfgj["base_model_name_or_path"]).exists():
        path = cfgj["base_model_name_or_path"]
    else:
        raise FileNotFoundError("which base model? pass --model (a builtin name or folder); the adapter's "
                                "base_model_name_or_path is missing or not on this machine")
    tok_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path
    tok = AutoTokenizer.from_pretrained(tok_dir)
    task = task or cfgj.get("task_type") or "CAUSAL_LM"
    if task == "SEQ_CLS":
        n = num_labels(adapter) if adapter else 2
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n, dtype=torch.float32, **(load_kwargs or {}))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **(load_kwargs or {}))
    return model, tok, path, task


def num_labels(adapter: str) -> int:
    """The classifier size saved with an adapter (its modules_to_save head), else 2."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return f.get_slice(k).get_shape()[0]
    return 2
