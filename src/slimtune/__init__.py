"""slimtune: parameter-efficient fine-tuning with HF PEFT's API and files, plus the whole job.

    from slimtune import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()

Names are exported lazily (PEP 562): `import slimtune` (and `slimtune --help`) does not import
torch or transformers until a name that needs them is used; `from slimtune import *` and every
name in `__all__` resolve as before.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "AdapterConfig": ("config", "AdapterConfig"), "PeftConfig": ("config", "AdapterConfig"),
    "ConfigError": ("config", "ConfigError"), "CheckpointError": ("checkpoint", "CheckpointError"),
    "TargetError": ("targeting", "TargetError"), "UnknownAdapterError": ("tuner", "UnknownAdapterError"),
    "AdapterLayer": ("inject", "AdapterLayer"), "ModulesToSaveWrapper": ("inject", "ModulesToSaveWrapper"),
    "PeftType": ("peft_types", "PeftType"), "TaskType": ("peft_types", "TaskType"),
    "LoraConfig": ("methods.lora", "LoraConfig"), "LoraModel": ("methods.lora", "LoraModel"),
    "IA3Config": ("methods.ia3", "IA3Config"), "IA3Model": ("methods.ia3", "IA3Model"),
    "LoHaConfig": ("methods.loha", "LoHaConfig"), "LoHaModel": ("methods.loha", "LoHaModel"),
    "LoKrConfig": ("methods.lokr", "LoKrConfig"), "LoKrModel": ("methods.lokr", "LoKrModel"),
    "VeraConfig": ("methods.vera", "VeraConfig"), "VeraModel": ("methods.vera", "VeraModel"),
    "OFTConfig": ("methods.oft", "OFTConfig"), "OFTModel": ("methods.oft", "OFTModel"),
    "PrefixTuningConfig": ("methods.prefix", "PrefixTuningConfig"),
    "PromptTuningConfig": ("methods.prompt", "PromptTuningConfig"),
    "PromptEncoderConfig": ("methods.prompt", "PromptEncoderConfig"),
    "AdaLoraConfig": ("methods.adalora", "AdaLoraConfig"), "AdaLoraModel": ("methods.adalora", "AdaLoraModel"),
    "DoraConfig": ("methods.dora", "DoraConfig"), "BottleneckConfig": ("methods.bottleneck", "BottleneckConfig"),
    "BitFitConfig": ("methods.bitfit", "BitFitConfig"), "LayerwiseConfig": ("methods.layerwise", "LayerwiseConfig"),
    "SparseConfig": ("methods.sparse", "SparseConfig"), "HeadsConfig": ("methods.heads", "HeadsConfig"),
    "SingularConfig": ("methods.singular", "SingularConfig"), "FullConfig": ("methods.full", "FullConfig"),
    "BASE_ADAPTER": ("methods.lora_layers", "BASE_ADAPTER"),
    "PeftModel": ("model", "PeftModel"), "PeftModelForCausalLM": ("model", "PeftModelForCausalLM"),
    "PeftModelForSequenceClassification": ("model", "PeftModelForSequenceClassification"),
    "PeftModelForSeq2SeqLM": ("model", "PeftModelForSeq2SeqLM"),
    "PeftModelForTokenClassification": ("model", "PeftModelForTokenClassification"),
    "PeftModelForQuestionAnswering": ("model", "PeftModelForQuestionAnswering"),
    "PeftModelForFeatureExtraction": ("model", "PeftModelForFeatureExtraction"),
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": ("model", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING"),
    "get_peft_model": ("model", "get_peft_model"), "inject_adapter_in_model": ("model", "inject_adapter_in_model"),
    "get_peft_model_state_dict": ("state_dict", "get_peft_model_state_dict"),
    "set_peft_model_state_dict": ("state_dict", "set_peft_model_state_dict"),
    "get_base_model_state_dict": ("state_dict", "get_base_model_state_dict"),
    "set_base_model_state_dict": ("state_dict", "set_base_model_state_dict"),
    "load_peft_weights": ("state_dict", "load_peft_weights"),
    "hotswap_adapter": ("hotswap", "hotswap_adapter"),
    "prepare_model_for_compiled_hotswap": ("hotswap", "prepare_model_for_compiled_hotswap"),
    "hotswap_adapter_from_state_dict": ("hotswap", "hotswap_adapter_from_state_dict"),
    "get_layer_status": ("status", "get_layer_status"), "get_model_status": ("status", "get_model_status"),
    "TunerLayerStatus": ("status", "TunerLayerStatus"), "TunerModelStatus": ("status", "TunerModelStatus"),
    "AutoPeftModel": ("auto", "AutoPeftModel"), "AutoPeftModelForCausalLM": ("auto", "AutoPeftModelForCausalLM"),
    "AutoPeftModelForSequenceClassification": ("auto", "AutoPeftModelForSequenceClassification"),
    "AutoPeftModelForSeq2SeqLM": ("auto", "AutoPeftModelForSeq2SeqLM"),
    "AutoPeftModelForTokenClassification": ("auto", "AutoPeftModelForTokenClassification"),
    "AutoPeftModelForQuestionAnswering": ("auto", "AutoPeftModelForQuestionAnswering"),
    "AutoPeftModelForFeatureExtraction": ("auto", "AutoPeftModelForFeatureExtraction"),
    "OfflineError": ("hub", "OfflineError"),
    "all_methods": ("registry", "all_methods"), "get_method": ("registry", "get_method"),
    "make_config": ("registry", "make_config"),
    "prepare_model_for_kbit_training": ("quant", "prepare_model_for_kbit_training"),
    "convert_to_lora": ("methods.to_lora", "convert_to_lora"), "save_as_lora": ("methods.to_lora", "save_as_lora"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        # a submodule (`slimtune.methods.sparse.fisher_scores` after a bare `import slimtune`), as the
        # eager imports used to make available
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'slimtune' has no attribute '{name}'")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
