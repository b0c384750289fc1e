"""`Task`: what one task owns — its model class, processor, data formats, adapter defaults,
metrics and prediction. A task module subclasses it and registers with `@register_task`.

The defaults here are a text task's (a tokenizer from the model folder); each hook says what the
pipeline asks and when.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class Task:
    name: str = ""
    peft_task_type: str | None = None  # PEFT's task_type written to adapter_config.json (None: no PEFT class)
    kind: str = "model"  # in messages: "cannot be loaded as a <kind>"
    formats: tuple[str, ...] = ()  # data formats (data.py) that make `task: auto` pick this task
    generates: bool = False  # a language model: per-token loss, perplexity, generations, a larger LoRA rank
    heads: tuple[str, ...] = ()  # names of a freshly initialised head: trains in full, stays dense when quantized
    task_keys: tuple[str, ...] = ()  # method-block keys this task reads (and adapter_defaults pops), e.g. a VLM's layer switches

    # ---- the model ---------------------------------------------------------------------------------
    def owns_model(self, model_name: str, hf_cfg: Any) -> bool:
        """Whether the model alone decides this task under `task: auto` (text models do not: their
        data chooses between language modelling and classification)."""
        return False

    def accepts_model(self, model_name: str, hf_cfg: Any) -> bool:
        """Whether this model can do the task when the data picked it (`task: auto`): a text model
        given image rows cannot."""
        return True

    def load_processor(self, cfg: Any, path: str | None) -> Any:
        """What turns raw inputs into tensors: a tokenizer here (None without a folder)."""
        return load_tokenizer(cfg.model_name(), path)

    def model_class(self, hf_cfg: Any = None) -> Any:
        raise NotImplementedError

    def model_kwargs(self, num_labels: int | None, labels: list[str] | None) -> dict[str, Any]:
        return {}

    def load_model(self, cfg: Any, path: str | None, num_labels: int | None, dtype: torch.dtype,
                   kw: dict[str, Any], labels: list[str] | None = None, log=print) -> nn.Module:
        from ..config import JobConfigError
        from ..job import hf_quiet

        try:
            with hf_quiet():
                return self.model_class().from_pretrained(path, dtype=dtype, **self.model_kwargs(num_labels, labels), **kw)
        except (OSError, ValueError, KeyError) as e:
            raise JobConfigError(f"model '{cfg.model_name()}' cannot be loaded as a {self.kind} from {path}: "
                                 f"{str(e)[:300]}{self.load_hint()}") from None

    def load_hint(self) -> str:
        return ""

    def skeleton(self, hf_cfg: Any, num_labels: int | None) -> nn.Module:
        """The model on the meta device from its config (search counts parameters on it)."""
        with torch.device("meta"):
            return self.model_class(hf_cfg).from_config(hf_cfg)

    def check_format(self, fmt: str | None, keys: set[str], cfg: Any, source: str) -> None:
        """Refuse data this task cannot train on, with the fix (`fmt` None: the columns told nothing).
        Here: media rows (image / audio files) for a task that does not read them."""
        from ..datafiles import DataError
        from . import all_tasks
        from .media import MEDIA_FORMATS

        if fmt in MEDIA_FORMATS and fmt not in self.formats:
            media = "image" if fmt in ("image_files", "vision_chat") else "audio"
            column = "images" if fmt == "vision_chat" else media
            raise DataError(f"{source}: the rows hold {media} files (column {column!r}), but task is {self.name}; set "
                            f"task: {' or '.join(t for t, spec in all_tasks().items() if fmt in spec.formats)} with a "
                            "model for it, or give rows for this task")

    def check_builtin(self, fmt: str, source: str) -> None:
        """Refuse a builtin dataset of a format this task cannot train on."""

    def after_data(self, processor: Any, data: Any) -> None:
        """Set-up once the data is read (e.g. a chat template for an LM)."""

    def configure(self, model: nn.Module, processor: Any, data: Any, num_labels: int | None) -> None:
        """Set-up of the loaded model from the data (a classifier's pad id and label names)."""

    def describe(self, data: Any) -> str | None:
        """A line the run logs about the task's model (e.g. a new head)."""
        return None

    # ---- the adapter -------------------------------------------------------------------------------
    def adapter_defaults(self, model: nn.Module, kw: dict[str, Any], fields: set[str], why: list[str]) -> None:
        """Task-given method keys the user did not set (task_type, a head in modules_to_save)."""
        if self.peft_task_type and "task_type" in fields and "task_type" not in kw:
            kw["task_type"] = self.peft_task_type

    # ---- evaluation --------------------------------------------------------------------------------
    def measured_metrics(self, ev: Any) -> list[str]:
        return ["eval_loss", "accuracy", "f1"]

    def default_metric(self, ev: Any) -> str:
        return "accuracy"

    def evaluate(self, ev: Any) -> dict[str, float] | None:
        """The task's own held-out evaluation, or None for evaluate.py's (loss, classes, LM metrics)."""
        return None

    def class_metrics(self, ranks: list[int], preds: list[int], golds: list[int], n: int) -> dict[str, float]:
        """A classifier's metrics from the gold class's rank (0 = predicted), predictions and golds."""
        from ..metrics import accuracy_f1

        return accuracy_f1(preds, golds, n)

    # ---- predict -----------------------------------------------------------------------------------
    def read_inputs(self, source: str) -> list[dict[str, Any]]:
        """`slimtune predict`'s input rows: a data file, or stdin ("-")."""
        from ..predict import read_inputs

        return read_inputs(source)

    def predict(self, model: nn.Module, processor: Any, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[dict[str, Any]]:
        """Each row plus this task's answer. `opts`: adapter, data_cfg, fmt, column, batch_size,
        max_new_tokens, temperature (the CLI's)."""
        raise NotImplementedError(f"task {self.name} has no predict")

    # ---- a saved adapter ---------------------------------------------------------------------------
    def load_for_adapter(self, path: str, adapter: str | None, load_kwargs: dict | None) -> tuple[nn.Module, Any]:
        """(base model, processor) for `predict` / `merge` / `serve` of an adapter of this task."""
        from ..job import hf_quiet

        from transformers import AutoTokenizer

        tok_dir = adapter if adapter and _has(adapter, "tokenizer_config.json") else path
        with hf_quiet():
            tok = AutoTokenizer.from_pretrained(tok_dir)
            model = self.model_class().from_pretrained(path, dtype=torch.float32,
                                                       **self.adapter_model_kwargs(adapter), **(load_kwargs or {}))
        return model, tok

    def adapter_model_kwargs(self, adapter: str | None) -> dict[str, Any]:
        return {}

    def save_merged(self, merged: nn.Module, processor: Any, out: Any, base: str) -> str:
        """Write a merged model (and its processor) to the folder `out`; returns how to load it."""
        merged.save_pretrained(out)
        if processor is not None:
            processor.save_pretrained(out)
        return f"transformers.{type(merged).__name__}.from_pretrained('{{out}}')"


def _has(folder: str, name: str) -> bool:
    from pathlib import Path

    return (Path(folder) / name).is_file()


def load_tokenizer(model_name: str, path: str | None):
    """The model folder's tokenizer, with a pad token (eos, else unk); None without a folder."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    from ..config import JobConfigError
    from ..job import hf_quiet

    try:
        with hf_quiet():
            tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise JobConfigError(f"model '{model_name}': no tokenizer could be loaded from {path} ({str(e)[:200]}); the "
                             "folder needs tokenizer files (save_pretrained of the tokenizer), or, for an image "
                             "model, set task: image_classification") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def saved_labels(adapter: str | None) -> list[str] | None:
    """The class names a classifier adapter was trained with (labels.json, written by `train`)."""
    import json
    from pathlib import Path

    if not adapter or not (Path(adapter) / "labels.json").is_file():
        return None
    try:
        names = json.loads((Path(adapter) / "labels.json").read_text())
    except ValueError:
        return None
    return [str(x) for x in names] if isinstance(names, list) else None


def saved_num_labels(adapter: str | None) -> int:
    """The classifier size saved with an adapter (its modules_to_save head), else labels.json's, else 2."""
    from pathlib import Path

    from safetensors import safe_open

    if not adapter:
        return 2
    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return f.get_slice(k).get_shape()[0]
    labels = saved_labels(adapter)
    return len(labels) if labels else 2


def label_kwargs(n: int | None, labels: list[str] | None) -> dict[str, Any]:
    """from_pretrained's num_labels (+ id2label / label2id when the names fit), for a classifier."""
    kw: dict[str, Any] = {"num_labels": n}
    if labels and len(labels) == n:
        kw.update(id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    return kw
