"""What slimtune knows about common model families: default targets and where the head is.

Keyed by `config.model_type`. LoRA defaults are PEFT's (attention query/value), so a config
without target_modules selects the same modules in both libraries.
"""
from __future__ import annotations

import torch.nn as nn

LORA_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "phi", "phi3", "opt", "bart", "mbart", "gptj", "starcoder2", "olmo", "olmo2",
        "granite", "cohere", "stablelm", "smollm3", "m2m_100", "marian", "blenderbot", "whisper")},
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "megatron-bert")},
    **{t: ["q", "v"] for t in ("t5", "mt5", "umt5", "longt5")},
    **{t: ["query_key_value"] for t in ("gpt_neox", "bloom", "falcon", "chatglm")},
    **{t: ["c_attn"] for t in ("gpt2", "gpt_bigcode")},
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "mpt": ["Wqkv"],
    "gpt_neo": ["q_proj", "v_proj"],
    "albert": ["query", "value"],
    "vit": ["query", "value"],
    **{t: ["query", "value"] for t in ("deit", "dinov2", "data2vec-vision")},
    **{t: ["q_proj", "v_proj"] for t in ("clip", "clip_vision_model", "siglip", "siglip_vision_model")},
}

# Names a newer transformers gives the same layers (ViT's query/value became q_proj/v_proj in 5.x):
# the default is the first set the model has.
RENAMED: dict[str, list[list[str]]] = {t: [["q_proj", "v_proj"]] for t in ("vit", "deit", "dinov2", "data2vec-vision")}

# task_type -> names of the freshly initialised head that must train in full (PEFT's rule).
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


def model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def default_lora_targets(model: nn.Module) -> list[str] | None:
    declared = getattr(model, "lora_targets", None)  # a model class that names its own (train/tasks/cnn.py)
    if isinstance(declared, list):
        return list(declared)
    mt = model_type(model)
    if mt not in LORA_TARGETS:
        return None
    if mt in RENAMED:
        leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        for names in (LORA_TARGETS[mt], *RENAMED[mt]):
            if set(names) <= leaves:
                return list(names)
    return list(LORA_TARGETS[mt])
