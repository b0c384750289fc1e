"""Image classification: a transformers image classifier (ViT, CLIP, SigLIP, DeiT, DINOv2, ...;
`AutoModelForImageClassification` with num_labels and the label names) or the digits CNN, from an
image folder with a subfolder per class, or rows with an `image` column of paths (relative to the
data file), or rows of `pixels` grids. Pixels come from the model's image processor (RGB or grey,
resized and normalised as it says); a model folder without one gets a processor built from its
config (size from config.image_size, mean = std = 0.5), said in the log.

Metrics: accuracy, macro-F1, and top-k accuracy (k = min(5, classes - 1)) from three classes up.
The new head (`classifier`) trains in full: modules_to_save, as PEFT's ViT guide does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..datafiles import DataError
from . import register_task
from .base import Task, label_kwargs, saved_labels, saved_num_labels
from .cnn import CNN_MODELS, cnn_processor, efficientnet_lite0
from .media import IMAGE_EXT, folder_rows, media_path

# model types whose checkpoints classify images (or are vision towers that AutoModelForImageClassification wraps)
IMAGE_TYPES = {"vit", "deit", "beit", "dinov2", "convnext", "convnextv2", "swin", "swinv2", "mobilevit", "resnet",
               "efficientnet", "regnet", "levit", "clip", "clip_vision_model", "siglip", "siglip_vision_model",
               "data2vec-vision", "poolformer", "pvt", "focalnet", "hiera"}


def top_k(n: int) -> int | None:
    """The k of top-k accuracy for n classes (None below 3: top-2 of 2 is always right)."""
    return min(5, n - 1) if n >= 3 else None


@register_task
class ImageClassification(Task):
    name = "image_classification"
    kind = "image classifier"
    formats = ("image", "image_files")
    heads = ("classifier",)
    data_hint = "images: a folder with a subfolder per class, rows with an 'image' column of paths and a 'label', or 'pixels' grids"

    def check_format(self, fmt, keys, cfg, source) -> None:
        if fmt not in self.formats:
            raise DataError(f"{source}: task {self.name} needs {self.data_hint}; the rows have {sorted(keys)}"
                            + (f" ({fmt} data)" if fmt else ""))

    def owns_model(self, model_name: str, hf_cfg: Any) -> bool:
        if model_name in TORCH_MODELS:
            return True
        if hf_cfg is None:
            return False
        archs = getattr(hf_cfg, "architectures", None) or []
        return any(a.endswith("ForImageClassification") for a in archs) or hf_cfg.model_type in IMAGE_TYPES

    def accepts_model(self, model_name: str, hf_cfg: Any) -> bool:
        return self.owns_model(model_name, hf_cfg)

    def model_class(self, hf_cfg: Any = None):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def model_kwargs(self, num_labels: int | None, labels: list[str] | None) -> dict[str, Any]:
        # a checkpoint's own head has another size: a fresh one (trained in full) replaces it
        return {**label_kwargs(num_labels, labels), "ignore_mismatched_sizes": True}

    def load_processor(self, cfg: Any, path: str | None) -> Any:
        if cfg.model_name() in CNN_MODELS:
            return cnn_processor()
        return None if path is None else image_processor(path)

    def load_model(self, cfg, path, num_labels, dtype, kw, labels=None, log=print) -> nn.Module:
        from ..config import JobConfigError

        if cfg.model_name() in TORCH_MODELS:
            if cfg.model_options().quantize != "none":
                raise JobConfigError(f"model.quantize applies to transformers models; {cfg.model_name()} is not one")
            return torch_model(cfg.model_name(), num_labels, log)
        return super().load_model(cfg, path, num_labels, dtype, kw, labels, log)

    def skeleton(self, hf_cfg: Any, num_labels: int | None) -> nn.Module:
        hf_cfg.num_labels = num_labels or 2
        return super().skeleton(hf_cfg, num_labels)

    def describe(self, data: Any) -> str | None:
        return f"classifier head: {len(data.labels or [])} classes {data.labels} (a new head trains in full with the adapter)"

    def adapter_defaults(self, model: nn.Module, kw: dict[str, Any], fields: set[str], why: list[str]) -> None:
        heads = getattr(model, "new_heads", None) or (self.heads if getattr(model, "config", None) is not None else ())
        if not heads or "modules_to_save" not in fields or "modules_to_save" in kw:
            return  # the digits CNN keeps its pretrained head; a user's choice stands
        found = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n.split(".")[-1] in heads})
        if found:
            kw["modules_to_save"] = found
            why.append(f"modules_to_save={found}: the new classifier head trains in full (as PEFT's image-classification guide)")

    def class_metrics(self, ranks: list[int], preds: list[int], golds: list[int], n: int) -> dict[str, float]:
        res = super().class_metrics(ranks, preds, golds, n)
        k = top_k(n)
        if k is not None:
            res[f"top{k}_accuracy"] = sum(r < k for r in ranks) / max(len(ranks), 1)
        return res

    def measured_metrics(self, ev: Any) -> list[str]:
        k = top_k(len(ev.data.labels or []))
        return ["eval_loss", "accuracy", "f1"] + ([f"top{k}_accuracy"] if k else [])

    def read_inputs(self, source: str) -> list[dict[str, Any]]:
        return read_image_inputs(source)

    def predict(self, model, processor, rows, opts):
        return classify_images(model, processor, rows, saved_labels(opts["adapter"]), opts["batch_size"])

    def load_for_adapter(self, path: str, adapter: str | None, load_kwargs: dict | None) -> tuple[nn.Module, Any]:
        from ..job import hf_quiet

        if path in TORCH_MODELS:  # a CNN by name: its head sized as the adapter's
            return torch_model(path, saved_num_labels(adapter)), (cnn_processor() if path in CNN_MODELS else None)

        proc_dir = adapter if adapter and (Path(adapter) / "preprocessor_config.json").is_file() else path
        with hf_quiet():
            model = self.model_class().from_pretrained(path, dtype=torch.float32, **self.adapter_model_kwargs(adapter),
                                                       **(load_kwargs or {}))
        return model, image_processor(proc_dir, getattr(model, "config", None))

    def adapter_model_kwargs(self, adapter: str | None) -> dict[str, Any]:
        return {**label_kwargs(saved_num_labels(adapter), saved_labels(adapter)), "ignore_mismatched_sizes": True}

    def save_merged(self, merged: nn.Module, processor: Any, out: Any, base: str) -> str:
        """A transformers classifier as its own folder; a CNN (no save_pretrained) as model.safetensors
        + slimtune_model.json naming the model and its class count."""
        if base not in TORCH_MODELS:
            return super().save_merged(merged, processor, out, base)
        import json

        from safetensors.torch import save_file

        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(Path(out) / "model.safetensors"))
        n = merged.state_dict()[next(k for k in merged.state_dict() if k.endswith(("_fc.weight", "fc2.weight")))].shape[0]
        (Path(out) / "slimtune_model.json").write_text(json.dumps({"model": base, "num_labels": n}) + "\n")
        return (f"slimtune.train.tasks.image_classification.torch_model('{base}', {n}).load_state_dict("
                "safetensors.torch.load_file('{out}/model.safetensors'))")


TORCH_MODELS = ("digits-cnn", *CNN_MODELS)  # CNNs built by name (no transformers folder)


def torch_model(name: str, num_labels: int | None = None, log=print) -> nn.Module:
    """A CNN by name: the digits CNN (its pretrained 5-way head) or EfficientNet-Lite0 with a new head of
    `num_labels`; `name_or_path` is its name, so a saved adapter records its base."""
    from .. import models

    model = models.digits_cnn(log) if name == "digits-cnn" else efficientnet_lite0(num_classes=num_labels or 2)
    model.name_or_path = name
    return model


# ---- pixels ----------------------------------------------------------------------------------------

def image_processor(path: str, hf_cfg: Any = None, log=print):
    """The folder's image processor, else one built from the model config (a packaged or hand-saved
    model often ships none): resize to config.image_size, scale to [0, 1], normalise with 0.5 / 0.5."""
    from transformers import AutoImageProcessor

    from ..job import hf_quiet

    try:
        with hf_quiet():
            return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        pass
    from transformers import AutoConfig

    try:  # transformers 5: the PIL backend by name (the default one wants torchvision)
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor
    conf = hf_cfg or AutoConfig.from_pretrained(path)
    vis = getattr(conf, "vision_config", None) or conf
    size = getattr(vis, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    log(f"image processor: none in {path}; resizing to {size}x{size}, mean 0.5, std 0.5 (from the model config)")
    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def channels(proc: Any) -> int:
    mean = getattr(proc, "image_mean", None)
    return len(mean) if isinstance(mean, (list, tuple)) else 3


def open_image(path: Path, where: str, mode: str = "RGB"):
    """The image at `path` in `mode`, or one DataError naming the file and the row."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{where}: image file {str(path)!r} does not exist; image paths are relative to the data "
                        "file's folder (or absolute)")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: image file {str(path)!r} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                        "replace the file or drop the row") from None


def pixels(proc: Any, images: list) -> torch.Tensor:
    """(B, C, H, W) float pixels of PIL images, by the processor."""
    return proc(images=images, return_tensors="pt")["pixel_values"]


def encode_file(proc: Any, row: dict[str, Any], column: str, source: str, i: int) -> dict[str, Any]:
    """One image row -> {"pixel_values": (C, H, W)} (the label is added by the caller)."""
    if proc is None or not hasattr(proc, "image_mean"):
        raise DataError(f"{source}: the rows hold image files (column {column!r}), but the model is not an image "
                        "model; use an image classifier folder (ViT, CLIP, SigLIP, ...) with task: image_classification")
    mode = "L" if channels(proc) == 1 else "RGB"
    img = open_image(media_path(row[column], source), f"{source}: row {i}", mode)
    return {"pixel_values": pixels(proc, [img])[0]}


def encode_grid(row: dict[str, Any], source: str, i: int) -> dict[str, Any]:
    """One `pixels` row (a grid of numbers) -> {"pixel_values": (1, H, W)}."""
    try:
        px = torch.tensor(row["pixels"], dtype=torch.float32).unsqueeze(0)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{source}: row {i}: pixels must be a rectangular list of numbers ({e})") from None
    return {"pixel_values": px}


# ---- predict ---------------------------------------------------------------------------------------

def read_image_inputs(source: str) -> list[dict[str, Any]]:
    """`slimtune predict` inputs: an image file, a folder of images (recursively), or a data file with an
    `image` column."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXT)
        if not files:
            raise DataError(f"{source}: no image files ({', '.join(IMAGE_EXT)}) in this folder")
        return [{"image": str(f)} for f in files]
    if p.suffix.lower() in IMAGE_EXT:
        return [{"image": str(p)}]
    from ..datafiles import read_rows

    rows = read_rows(source)
    if "pixels" in rows[0]:  # grids of numbers (the digits CNN's rows)
        return rows
    if "image" not in rows[0]:
        raise DataError(f"{source}: an image classifier predicts on image files: pass an image, a folder of images, "
                        f"or a data file with an 'image' column (this one has {sorted(map(str, rows[0]))})")
    return [{**r, "image": str(media_path(r["image"], source))} for r in rows]


@torch.no_grad()
def classify_images(model, proc, rows: list[dict[str, Any]], labels: list[str] | None,
                    batch_size: int = 16) -> list[dict[str, Any]]:
    """Each row plus `label` (the most probable class) and `probability` (its softmax probability)."""
    model.eval()
    dev = next(model.parameters()).device
    mode = "L" if channels(proc) == 1 else "RGB"
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        if "pixels" in chunk[0]:
            x = torch.stack([encode_grid(r, "input", s + j + 1)["pixel_values"] for j, r in enumerate(chunk)])
        else:
            x = pixels(proc, [open_image(Path(r["image"]), f"input row {s + j + 1}", mode) for j, r in enumerate(chunk)])
        logits = model(pixel_values=x.to(dev))["logits"].float()
        p, idx = logits.softmax(-1).max(-1)
        for r, i, q in zip(chunk, idx.tolist(), p.tolist()):
            out.append({**r, "label": labels[i] if labels and i < len(labels) else str(i), "probability": round(q, 6)})
    return out
