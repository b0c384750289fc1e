"""PEFT's `AutoPeftModel*` classes: load the base model named in adapter_config.json, then the adapter.

    model = AutoPeftModelForCausalLM.from_pretrained("runs/default/best")

Offline, so the base must be on this machine: a local folder, or a model slimtune ships named by
its Hub id (base_model_name_or_path: "HuggingFaceTB/SmolLM2-135M-Instruct" loads the packaged copy).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import AdapterConfig
from .model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel


def _base_path(name: str | None, adapter: str) -> str:
    from .train import models

    if name and name in models.HUB_IDS.values():
        return models.resolve(name, log=lambda *_: None)
    if name and Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    raise FileNotFoundError(f"the base model of '{adapter}' ({name!r}) is not on this machine and slimtune does not "
                            "download: load the base yourself and use PeftModel.from_pretrained(base, folder)")


def _saved_num_labels(adapter: str) -> int:
    """The classifier size saved with an adapter (its modules_to_save head), else transformers' 2."""
    from .checkpoint import read_adapter_weights

    for k, v in read_adapter_weights(adapter).items():
        if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
            return v.shape[0]
    return 2


class _BaseAutoPeftModel:
    _target_class: str | None = None  # the transformers Auto class for the base
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        revision: str | None = None, **kwargs: Any) -> PeftModel:
        import transformers

        path = str(pretrained_model_name_or_path)
        cfg = config or AdapterConfig.from_pretrained(path)
        task = str(cfg.task_type or "")
        auto = cls._target_class or _AUTO_FOR_TASK.get(task, "AutoModel")
        if task == "SEQ_CLS" and "num_labels" not in kwargs:
            kwargs["num_labels"] = _saved_num_labels(path)
        base = getattr(transformers, auto).from_pretrained(_base_path(cfg.base_model_name_or_path, path), **kwargs)
        tok_file = Path(path) / "tokenizer_config.json"
        if tok_file.is_file():  # PEFT: an adapter saved with an extended tokenizer resizes the embeddings
            tok = transformers.AutoTokenizer.from_pretrained(path)
            if len(tok) != base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(len(tok))
        peft_cls = cls._target_peft_class if cls._target_peft_class is not PeftModel else \
            MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel)
        return peft_cls.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=is_trainable, config=cfg)


_AUTO_FOR_TASK = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                  "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                  "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def _auto(name: str, task: str | None) -> type:
    attrs = {"_target_class": _AUTO_FOR_TASK[task] if task else None,
             "_target_peft_class": MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task] if task else PeftModel}
    return type(name, (_BaseAutoPeftModel,), attrs)


AutoPeftModel = _auto("AutoPeftModel", None)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _auto("AutoPeftModelForSequenceClassification", "SEQ_CLS")
AutoPeftModelForTokenClassification = _auto("AutoPeftModelForTokenClassification", "TOKEN_CLS")
AutoPeftModelForQuestionAnswering = _auto("AutoPeftModelForQuestionAnswering", "QUESTION_ANS")
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "FEATURE_EXTRACTION")
