"""Text classification: text (+ text_pair) + label rows, a sequence classifier with a new head that
trains in full (PEFT's SEQ_CLS: `classifier` / `score` in modules_to_save); accuracy and macro-F1."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from . import register_task
from .base import Task, label_kwargs, saved_labels, saved_num_labels


@register_task
class TextClassification(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    kind = "sequence classifier"
    formats = ("classification",)
    heads = ("classifier", "score")

    def model_class(self, hf_cfg: Any = None):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, num_labels: int | None, labels: list[str] | None) -> dict[str, Any]:
        return {"num_labels": num_labels}

    def load_hint(self) -> str:
        return "; is task right? (a decoder-only model wants task: causal_lm)"

    def skeleton(self, hf_cfg: Any, num_labels: int | None) -> nn.Module:
        hf_cfg.num_labels = num_labels or 2
        return super().skeleton(hf_cfg, num_labels)

    def check_format(self, fmt, keys, cfg, source) -> None:
        from ..datafiles import DataError

        super().check_format(fmt, keys, cfg, source)
        if fmt is None:
            raise DataError(f"{source}: task classification needs a text column and a label column; the rows have "
                            f"{sorted(keys)}: set data.text_column and data.label_column to the right ones")
        if fmt not in ("classification", "image"):
            raise DataError(f"{source}: task classification needs a label column, but the rows have no "
                            f"{cfg.label_column!r} (columns: {sorted(keys)}); set data.label_column to the column that "
                            f"holds the classes (this data reads as {fmt} data: task causal_lm trains a language model "
                            "on it)")

    def check_builtin(self, fmt: str, source: str) -> None:
        from ..datafiles import DataError

        if fmt not in ("classification", "image"):
            raise DataError(f"{source} is {fmt} data, not classification data; use task: causal_lm (or auto), or a "
                            "classification builtin such as rotten_tomatoes")

    def configure(self, model: nn.Module, processor: Any, data: Any, num_labels: int | None) -> None:
        if getattr(model.config, "pad_token_id", None) is None and processor is not None:
            model.config.pad_token_id = processor.pad_token_id
        if data.labels and len(data.labels) == num_labels:  # a merged model then names its classes (pipelines read these)
            model.config.id2label = dict(enumerate(data.labels))
            model.config.label2id = {lab: i for i, lab in enumerate(data.labels)}

    def describe(self, data: Any) -> str | None:
        return f"classifier head: new, {len(data.labels or [])} classes {data.labels} (trained in full with the adapter)"

    def adapter_defaults(self, model: nn.Module, kw: dict[str, Any], fields: set[str], why: list[str]) -> None:
        if "task_type" in fields and "task_type" not in kw:
            kw["task_type"] = self.peft_task_type
            why.append("task_type=SEQ_CLS: the new classifier head trains in full (modules_to_save)")

    def adapter_model_kwargs(self, adapter: str | None) -> dict[str, Any]:
        n = saved_num_labels(adapter)
        return label_kwargs(n, saved_labels(adapter))

    def predict(self, model, processor, rows, opts):
        from ..predict import classify

        cfg = opts["data_cfg"]
        col = opts["column"] or (cfg.text_column if cfg else "text")
        return classify(model, processor, rows, saved_labels(opts["adapter"]), col,
                        cfg.text_pair_column if cfg else None, opts["batch_size"], cfg.max_length if cfg else 512)
