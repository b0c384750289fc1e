"""slimtune models in the tools built around PEFT.

    from slimtune.integrations import Trainer          # transformers.Trainer that saves/loads slimtune adapters
    from slimtune.integrations.trl import SFTTrainer   # trl.SFTTrainer, same, and peft_config=<slimtune config>

transformers and TRL recognise a PEFT model by `isinstance(m, peft.PeftModel)`. A slimtune model
already gives them what they read by duck typing: the wrapped model's forward signature (the
Trainer keeps the dataset columns it names), the task's label names on the class (`eval_loss`),
`_hf_peft_config_loaded` (quantized bases pass the Trainer's check). What needs the isinstance
check is checkpointing, so `PeftTrainerMixin` adds it: checkpoints hold the adapter in PEFT's
format (not the whole model) and `resume_from_checkpoint` / `load_best_model_at_end` load it back.
Plain `transformers.Trainer` gets the same three methods for slimtune models the first time one is
built around a slimtune model (`transformers.patch_trainer`), so changing only the import works.
"""
from __future__ import annotations

from typing import Any

_LAZY = {"PeftTrainerMixin": "transformers", "Trainer": "transformers", "SFTTrainer": "trl"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'slimtune.integrations' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
