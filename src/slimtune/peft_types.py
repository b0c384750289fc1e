"""PEFT's `PeftType` and `TaskType` enums (str-valued, so `PeftType.LORA == "LORA"` and JSON writes
the plain string), limited to the methods slimtune implements plus slimtune's own methods.

    config.peft_type          -> PeftType.LORA        config.peft_type.value -> "LORA"
    LoraConfig(task_type=TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
"""
from __future__ import annotations

import enum


class PeftType(str, enum.Enum):
    # PEFT's methods that slimtune implements (same values, same files)
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    VERA = "VERA"
    OFT = "OFT"
    # slimtune's own methods (PEFT has no such type; their files name these)
    DORA = "DORA"  # a registry key only: DoRA files say LORA with use_dora=true, as PEFT's
    BOTTLENECK = "BOTTLENECK"
    BITFIT = "BITFIT"
    LAYERWISE = "LAYERWISE"
    SPARSE = "SPARSE"
    HEADS = "HEADS"
    SINGULAR = "SINGULAR"
    FULL = "FULL"

    def __str__(self) -> str:  # "LORA" in messages and f-strings, as the plain string would print
        return self.value


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value
