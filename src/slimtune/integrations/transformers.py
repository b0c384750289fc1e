"""transformers' `Trainer` with slimtune models: adapter-only checkpoints in PEFT's format, and
resuming from them, as the Trainer does for `peft.PeftModel`.

    from slimtune.integrations import Trainer      # drop-in for transformers.Trainer
    class MyTrainer(PeftTrainerMixin, SomeTrainer)  # or mix it into another Trainer subclass

Plain `transformers.Trainer` works too: transformers saves a model it does not recognise as its
whole state dict (which fails with "Some tensors share memory" on a tied-embedding base such as
SmolLM2, and could not resume from an adapter anyway), so the first time a Trainer is built around
a slimtune model, `patch_trainer` gives transformers.Trainer the same three checkpoint methods for
slimtune models (PeftModel triggers it from the attributes the Trainer reads while it is built).
Every other model goes through transformers' own code unchanged.
"""
from __future__ import annotations

import functools
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


def slimtune_model(trainer, model=None) -> PeftModel | None:
    """The slimtune PeftModel a Trainer holds (unwrapped from accelerate's wrappers), else None."""
    m = trainer.model if model is None else model
    m = trainer.accelerator.unwrap_model(m) if getattr(trainer, "accelerator", None) is not None else m
    return m if isinstance(m, PeftModel) else None


def save_adapter_checkpoint(trainer, pm: PeftModel, output_dir: str | None) -> None:
    """What the Trainer's `_save` does for a peft.PeftModel: the adapter in PEFT's format (not the
    whole model), the tokenizer/processor and the training arguments."""
    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    if not trainer.args.should_save:
        return
    os.makedirs(output_dir, exist_ok=True)
    pm.save_pretrained(output_dir)  # adapter_config.json + adapter_model.safetensors (+ README.md)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


class PeftTrainerMixin:
    """Put before a transformers.Trainer (sub)class: slimtune PeftModels are checkpointed and
    resumed as adapters. Any other model goes through the Trainer unchanged."""

    def _slimtune_model(self, model=None):
        return slimtune_model(self, model)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        pm = slimtune_model(self)
        if pm is None:
            return super()._save(output_dir, state_dict)
        save_adapter_checkpoint(self, pm, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pm = slimtune_model(self, model)
        if pm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_checkpoint(pm, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        pm = slimtune_model(self)
        if pm is None:
            return super()._load_best_model()
        load_adapter_checkpoint(pm, self.state.best_model_checkpoint)


def patch_trainer() -> None:
    """Make plain transformers.Trainer (and subclasses that keep its methods, e.g. TRL's) checkpoint
    slimtune models as adapters, like PeftTrainerMixin; idempotent. transformers recognises PEFT
    models only by `isinstance(m, peft.PeftModel)`, so without this its `_save` writes the full state
    dict and crashes on tied embeddings."""
    cls = transformers.Trainer
    if cls.__dict__.get("_slimtune_patched"):
        return
    orig_save, orig_load, orig_best = cls._save, cls._load_from_checkpoint, cls._load_best_model

    @functools.wraps(orig_save)
    def _save(self, output_dir=None, state_dict=None):
        pm = slimtune_model(self)
        return orig_save(self, output_dir, state_dict) if pm is None else save_adapter_checkpoint(self, pm, output_dir)

    @functools.wraps(orig_load)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        pm = slimtune_model(self, model)
        if pm is None:
            return orig_load(self, resume_from_checkpoint, model)
        load_adapter_checkpoint(pm, resume_from_checkpoint)

    @functools.wraps(orig_best)
    def _load_best_model(self):
        pm = slimtune_model(self)
        if pm is None:
            return orig_best(self)
        load_adapter_checkpoint(pm, self.state.best_model_checkpoint)

    cls._save, cls._load_from_checkpoint, cls._load_best_model = _save, _load_from_checkpoint, _load_best_model
    cls._slimtune_patched = True


class Trainer(PeftTrainerMixin, transformers.Trainer):
    """transformers.Trainer that checkpoints slimtune adapters in PEFT's format (see module doc)."""
