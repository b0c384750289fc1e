"""TRL's `SFTTrainer` with slimtune: pass a slimtune model, or a base model plus a slimtune config.

    from slimtune.integrations.trl import SFTTrainer
    trainer = SFTTrainer(model=base_model, peft_config=slimtune.LoraConfig(r=16, target_modules="all-linear"),
                         train_dataset=ds, processing_class=tokenizer, args=SFTConfig(...))

What differs from trl.SFTTrainer, and why:
- `peft_config` may be a slimtune config (TRL accepts only peft's classes): the adapter is added
  with slimtune's get_peft_model, after `set_seed(args.seed)` as TRL does.
- TRL computes the loss with a fused LM head patched onto the model it sees as the causal LM; on
  a slimtune model that patch goes on the wrapped transformers model (what TRL does for a
  peft.PeftModel), whose `base_model` is the backbone TRL reads the hidden states from.
- checkpoints are the adapter in PEFT's format and resume from it (PeftTrainerMixin).
"""
from __future__ import annotations

import trl
from transformers import set_seed
from trl.trainer.utils import add_fused_lm_head

from ..config import AdapterConfig
from ..model import PeftModel, get_peft_model
from .transformers import PeftTrainerMixin

_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what trl.SFTTrainer asks the fused head for


class SFTTrainer(PeftTrainerMixin, trl.SFTTrainer):
    def __init__(self, model, args=None, *posargs, peft_config=None, **kwargs):
        if isinstance(peft_config, AdapterConfig):
            if isinstance(model, PeftModel):
                raise ValueError("model already holds adapters: pass either a slimtune model or a base model "
                                 "with peft_config, not both")
            if isinstance(model, str):
                from trl.trainer.utils import create_model_from_path

                model = create_model_from_path(model, **dict(getattr(args, "model_init_kwargs", None) or {}))
            set_seed(getattr(args, "seed", 42))  # TRL seeds before the adapter's random init
            model = get_peft_model(model, peft_config)
            peft_config = None
        super().__init__(model, args, *posargs, peft_config=peft_config, **kwargs)
        pm = self._slimtune_model()
        if pm is not None:
            # trl patched the wrapper's forward (its `base_model` is slimtune's tuner, not the backbone):
            # patch the transformers model inside instead, as TRL does for a peft.PeftModel
            pm.__dict__.pop("forward", None)
            add_fused_lm_head(pm.get_base_model(), outputs=_FUSED_OUTPUTS)
