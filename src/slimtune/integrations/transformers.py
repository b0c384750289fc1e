"""transformers' `Trainer` with slimtune models: adapter-only checkpoints in PEFT's format, and
resuming from them, as the Trainer does for `peft.PeftModel`.

    from slimtune.integrations import Trainer      # drop-in for transformers.Trainer
    class MyTrainer(PeftTrainerMixin, SomeTrainer)  # or mix it into another Trainer subclass

Without the mixin, transformers.Trainer trains and evaluates a slimtune model with default
arguments (the forward signature and label names are there), but saves the whole model's state
dict in checkpoints (which fails for tied embeddings) and cannot resume from an adapter.
"""
from __future__ import annotations

import os

import torch
import transformers

from ..model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"


def load_adapter_checkpoint(model: PeftModel, folder: str) -> None:
    """Load every adapter of `model` found in a checkpoint folder (PEFT's layout: "default" at the top,
    the others in sub-folders of their name) into the existing adapters, keeping which are active."""
    active = list(model.active_adapters)
    found = False
    for name, cfg in model.peft_config.items():
        path = folder if name == "default" else os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            model.load_adapter(path, name, is_trainable=not cfg.inference_mode)
            found = True
    if not found:
        raise ValueError(f"no adapter of this model ({', '.join(model.peft_config)}) in checkpoint '{folder}'; "
                         "it was written for another model or by another trainer")
    model.base_model.set_adapter(active if len(active) > 1 else active[0])
    model.train(model.training)


class PeftTrainerMixin:
    """Put before a transformers.Trainer (sub)class: slimtune PeftModels are checkpointed and
    resumed as adapters. Any other model goes through the Trainer unchanged."""

    def _slimtune_model(self, model=None):
        m = self.model if model is None else model
        m = self.accelerator.unwrap_model(m) if hasattr(self, "accelerator") else m
        return m if isinstance(m, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        pm = self._slimtune_model()
        if pm is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        pm.save_pretrained(output_dir)  # adapter_config.json + adapter_model.safetensors (+ README.md)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pm = self._slimtune_model(model)
        if pm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_checkpoint(pm, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        pm = self._slimtune_model()
        if pm is None:
            return super()._load_best_model()
        load_adapter_checkpoint(pm, self.state.best_model_checkpoint)


class Trainer(PeftTrainerMixin, transformers.Trainer):
    """transformers.Trainer that checkpoints slimtune adapters in PEFT's format (see module doc)."""
