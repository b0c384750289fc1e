"""`PeftModel`: the user's model plus a set of named adapters, with HF PEFT's API and files.

    PeftModel ─ base_model (the method's Tuner) ─ model (the user's model, adapters swapped in)

Names and meaning follow PEFT (get_peft_model, from_pretrained, save_pretrained, set_adapter,
merge_and_unload, ...) so PEFT code runs with only the import changed. Tools that read the
forward signature to pick inputs (transformers' Trainer, TRL) see the wrapped model's own
parameters on an instance (`inspect.signature(pm.forward)`), and the task's label names on the
class (`PeftModelForCausalLM.forward` takes `labels`), as they do for PEFT's classes.
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import AdapterConfig
from .model_files import AUTOCAST_DEFAULT, AdapterFiles, apply_key_mapping, base_model_name  # noqa: F401 (re-exported)
from .registry import get_method


class _BoundForward:
    """`pm.forward`: calls the class's forward; `inspect.signature` shows the wrapped model's forward
    parameters plus `adapter_names`, which is what the Trainer keeps dataset columns by."""

    __slots__ = ("_fn", "__self__")

    def __init__(self, fn, obj) -> None:
        self._fn, self.__self__ = fn, obj

    def __call__(self, *args, **kwargs):
        return self._fn(self.__self__, *args, **kwargs)

    @property
    def __func__(self):
        return self._fn

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(self._fn)
        try:
            base = inspect.signature(self.__self__.get_base_model().forward)
        except (TypeError, ValueError):
            return own.replace(parameters=list(own.parameters.values())[1:])
        params = [p for p in base.parameters.values() if p.kind != p.VAR_KEYWORD]
        extra = [own.parameters["adapter_names"]] if "adapter_names" not in base.parameters else []
        var_kw = [p for p in base.parameters.values() if p.kind == p.VAR_KEYWORD]
        return base.replace(parameters=params + extra + var_kw)


class _SignedForward:
    """Descriptor for `forward`: the function on the class, a `_BoundForward` on an instance."""

    def __init__(self, fn) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls=None):
        return self._fn if obj is None else _BoundForward(self._fn, obj)


def _forward(self, *args, labels=None, adapter_names: list[str] | None = None, **kwargs):
    """The wrapped model's forward. `adapter_names` (one per row) runs a mixed-adapter batch."""
    if labels is not None:
        kwargs["labels"] = labels
    if adapter_names is None:
        return self.base_model(*args, **kwargs)
    with self.base_model.mixed_batch(list(adapter_names)):
        return self.base_model(*args, **kwargs)


# What transformers.Trainer.__init__ reads from the model it is given (getattr with a default):
# reading one, once transformers.trainer is imported, installs integrations.transformers.patch_trainer
_TRAINER_PROBES = frozenset({"hf_device_map", "is_distributed_loading_by_transformers"})


class PeftModel(AdapterFiles, nn.Module):
    # transformers reads this flag to accept a quantized base that carries trainable adapters
    # (trainer_utils.validate_quantization_for_training); it means the same here.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool | None = AUTOCAST_DEFAULT, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        spec = get_method(peft_config.method)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = base_model_name(model)
        self.base_model = spec.tuner_cls(model, peft_config, adapter_name)
        self._untrainable_loaded: set[str] = set()
        cast_adapter_dtype(self.base_model, adapter_name, autocast_adapter_dtype)
        if "transformers.trainer" in sys.modules:  # see _TRAINER_PROBES; this covers any later Trainer too
            from .integrations.transformers import patch_trainer

            patch_trainer()
        if low_cpu_mem_usage:  # PEFT: the adapter's weights on meta until a load fills them
            from .save_options import adapter_to_meta

            adapter_to_meta(self.base_model.model, adapter_name)
        from .compat import is_activation_checkpointing

        known = any(n in dir(type(model)) for n in ("is_activation_checkpointing", "is_gradient_checkpointing"))
        if is_activation_checkpointing(model) or not known:  # PEFT's test: a model that cannot say counts as on
            self.prepare_model_for_gradient_checkpointing(model)

    # ---- delegation: a PeftModel behaves like the model it wraps --------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _TRAINER_PROBES and "transformers.trainer" in sys.modules:
                # a transformers.Trainer is being built around this model: teach it adapter checkpoints
                from .integrations.transformers import patch_trainer

                patch_trainer()
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def peft_type(self):
        """The method's PeftType (an enum; `.value` is PEFT's string, e.g. "LORA")."""
        cfg = next(iter(self.peft_config.values()), None)
        return None if cfg is None else cfg.peft_type

    @property
    def modules_to_save(self) -> set[str] | None:
        mods = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or [])}
        return mods or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.get_base_model(), "dtype", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    forward = _SignedForward(_forward)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        ctx = self.base_model.mixed_batch(list(adapter_names)) if adapter_names is not None else contextlib.nullcontext()
        with ctx:
            return self.base_model.generate(*args, **kwargs)

    def train(self, mode: bool = True):
        if mode:
            for name in self.active_adapters:
                if name in self._untrainable_loaded:
                    ckpt.warn_zero_trainable(name)
        return super().train(mode)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the (frozen) input embeddings' output require grad, so checkpointed blocks above them
        still backpropagate into their adapters; a quantized model is left as is (its preparation does
        this). PEFT's method, also run at wrapping time when the model checkpoints."""
        if not any(getattr(model, f, False) for f in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                model.get_input_embeddings().register_forward_hook(_output_requires_grad)
        return model

    # ---- adapters as a set ----------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool | None = AUTOCAST_DEFAULT) -> None:
        """A new, untrained adapter; it stays inactive (and frozen) until set_adapter, as in PEFT."""
        current = get_method(next(iter(self.peft_config.values())).method) if self.peft_config else None
        if current is not None and get_method(peft_config.method).tuner_cls is not current.tuner_cls:
            raise ValueError(f"this model holds {current.name} adapters; a {peft_config.method} adapter needs its "
                             "own PeftModel (methods cannot be mixed on one model)")
        if getattr(peft_config, "base_model_name_or_path", None) is None:
            peft_config.base_model_name_or_path = base_model_name(self.get_base_model())
        self.base_model.inject_adapter(peft_config, adapter_name)
        cast_adapter_dtype(self.base_model, adapter_name, autocast_adapter_dtype)
        if low_cpu_mem_usage:
            from .save_options import adapter_to_meta

            adapter_to_meta(self.base_model.model, adapter_name)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate an adapter; it trains unless `inference_mode=True` (PEFT's rule, also for an
        adapter loaded for inference)."""
        self.base_model.set_adapter(adapter_name)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self.peft_config[n].inference_mode = inference_mode
            if not inference_mode:
                self._untrainable_loaded.discard(n)
        self.base_model._mark_trainable()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            self.base_model._check(n)
            for p in self.base_model.adapter_parameters(n):
                p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)
        self._untrainable_loaded.discard(adapter_name)

    def list_adapters(self) -> list[str]:
        return list(self.peft_config)

    @contextlib.contextmanager
    def disable_adapter(self):
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         progressbar: bool = False) -> nn.Module:
        """Merge into the base weights and return the plain model, no slimtune module left."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---- reports --------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from .quant.backend import param_count  # a packed 4-bit weight counts its unpacked size, as PEFT does

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(param_count(p) for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    def get_layer_status(self):
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        from .status import get_model_status

        return get_model_status(self)


def _output_requires_grad(module: nn.Module, inputs, output) -> None:
    output.requires_grad_(True)








def cast_adapter_dtype(tuner: nn.Module, adapter: str, autocast_adapter_dtype: bool | None) -> None:
    """PEFT's `autocast_adapter_dtype=True`: fp16/bf16 adapter weights become fp32 (the fused LoRA path
    casts them to the input's dtype per call; gradients and optimizer state stay fp32). False or
    None (slimtune's default) keeps them in the base weights' dtype."""
    if not autocast_adapter_dtype:
        return
    for p in tuner.adapter_parameters(adapter):
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool | None = AUTOCAST_DEFAULT, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (PEFT's entry point); the
    PeftModel class of the config's task_type, as PEFT (PeftModelForCausalLM for CAUSAL_LM, ...)."""
    if mixed:
        raise NotImplementedError("get_peft_model(mixed=True) (PEFT's PeftMixedModel, several methods on one "
                                  "model) is not supported; use one method per model")
    if revision is not None:
        peft_config.revision = revision
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(peft_config.task_type or ""), PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: AdapterConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> nn.Module:
    """PEFT's low-level entry: swap adapter layers into `model` in place and return it (no PeftModel
    wrapper; the layers' own set_adapter / merge work, as PEFT's)."""
    if peft_config.is_prompt_learning:
        raise ValueError("inject_adapter_in_model does not support prompt learning methods (they wrap the model's "
                         "forward, there are no layers to inject); use get_peft_model")
    tuner = get_method(peft_config.method).tuner_cls(model, peft_config, adapter_name)
    if low_cpu_mem_usage:  # on meta; set_peft_model_state_dict(..., low_cpu_mem_usage=True) fills them
        from .save_options import adapter_to_meta

        adapter_to_meta(tuner.model, adapter_name)
    return tuner.model


# PEFT's task-specific classes: the same model, with the task's label names in the forward
# signature (what transformers' Trainer reads to find the labels and report eval_loss).
class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSequenceClassification(PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class PeftModelForTokenClassification(PeftModel):
    pass


class PeftModelForFeatureExtraction(PeftModel):
    pass


def _qa_forward(self, *args, start_positions=None, end_positions=None, adapter_names: list[str] | None = None,
                **kwargs):
    for k, v in (("start_positions", start_positions), ("end_positions", end_positions)):
        if v is not None:
            kwargs[k] = v
    return _forward(self, *args, adapter_names=adapter_names, **kwargs)


class PeftModelForQuestionAnswering(PeftModel):
    forward = _SignedForward(_qa_forward)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM, "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM, "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering, "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}
