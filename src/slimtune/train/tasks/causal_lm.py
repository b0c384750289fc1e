"""Causal language modelling (SFT): instruction / chat / ShareGPT / plain-text rows, loss on the
answer tokens (prompts.py); evaluation by loss, perplexity, answer choice and generated answers
(evaluate.py's LM path); predict = generate."""
from __future__ import annotations

from typing import Any

from . import register_task
from .base import Task


@register_task
class CausalLM(Task):
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    kind = "causal LM"
    formats = ("instruction", "chat", "text")
    generates = True

    def model_class(self, hf_cfg: Any = None):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def check_format(self, fmt, keys, cfg, source) -> None:
        from ..datafiles import DataError

        super().check_format(fmt, keys, cfg, source)
        if fmt == "classification":
            raise DataError(f"{source}: task causal_lm, but the rows are classification data ({cfg.text_column} + "
                            f"{cfg.label_column}); set task: classification, or data.format: text to train a language "
                            "model on the text column alone")

    def after_data(self, processor: Any, data: Any) -> None:
        from ..prompts import ensure_chat_template

        if processor is not None:
            ensure_chat_template(processor)

    def measured_metrics(self, ev: Any) -> list[str]:
        return ["eval_loss", "perplexity"] + (["choice_accuracy"] if ev._answer_first_tokens() else []) + \
            (["gen_accuracy"] if ev._do_generate() else [])

    def default_metric(self, ev: Any) -> str:
        return "gen_accuracy" if ev._do_generate() else "eval_loss"

    def predict(self, model, processor, rows, opts):
        from ..predict import generate

        return generate(model, processor, rows, opts["data_cfg"], opts["max_new_tokens"], opts["batch_size"],
                        opts["temperature"], opts["fmt"])
