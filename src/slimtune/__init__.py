"""slimtune: parameter-efficient fine-tuning with HF PEFT's API and files, plus the whole job.

    from slimtune import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
"""
from .config import AdapterConfig, ConfigError
from .checkpoint import CheckpointError
from .inject import AdapterLayer, ModulesToSaveWrapper
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.dora import DoraConfig
from .methods.full import FullConfig
from .methods.heads import HeadsConfig
from .methods.ia3 import IA3Config
from .methods.layerwise import LayerwiseConfig
from .methods.lora import LoraConfig, LoraModel
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptEncoderConfig, PromptTuningConfig
from .methods.singular import SingularConfig
from .methods.sparse import SparseConfig
from .methods.lora_layers import BASE_ADAPTER
from .model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                    PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification,
                    get_peft_model)
from .registry import all_methods, get_method, make_config
from .quant import prepare_model_for_kbit_training
from .targeting import TargetError
from .tuner import UnknownAdapterError

PeftConfig = AdapterConfig


class TaskType:
    """PEFT's task-type strings (plain str values, as PEFT's enum compares equal to them)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "PeftConfig", "ConfigError", "CheckpointError", "TargetError", "UnknownAdapterError",
    "AdapterLayer", "ModulesToSaveWrapper", "LoraConfig", "LoraModel", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForSequenceClassification", "PeftModelForSeq2SeqLM", "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "get_peft_model", "TaskType",
    "BASE_ADAPTER", "all_methods", "get_method", "make_config", "prepare_model_for_kbit_training",
    # every method's config: PEFT's names where PEFT has the method, slimtune's otherwise
    "IA3Config", "PrefixTuningConfig", "PromptTuningConfig", "PromptEncoderConfig", "DoraConfig",
    "BottleneckConfig", "BitFitConfig", "LayerwiseConfig", "SparseConfig", "HeadsConfig", "SingularConfig", "FullConfig",
]
