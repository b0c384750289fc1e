"""LoRA linears that read one input tensor (q/k/v, gate/up) run as one fused node: the groups are
learnt from the calls (`lora_layers.SHARE_INPUTS` switches it on; off by default, see there)."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..kernels.lora import lora_group_linear

if TYPE_CHECKING:
    from .lora_layers import Linear


class _SharedInput:
    """LoRA linears that read the same input tensor (q/k/v, gate/up), run as one fused node.

    Learnt, not configured: when consecutive LoRA linears are called on the very same tensor
    object, they join a group. On later calls the first member (the leader) computes every
    member's output with one `lora_group_linear` (one GEMM for all A-projections, one for the LoRA
    part of dx, one for all dA) and each other member picks up its own output — only if it is
    called on that same tensor, unchanged (identity and version checked), and else computes alone.
    So the result is always each layer's own function of its own input; a wrong guess costs time only.

    A new group switches on at its leader's next call made outside a backward pass, never in the
    middle of a step: activation checkpointing recomputes a forward inside backward and needs it
    to run exactly as the original did.
    """

    def __init__(self, first: "Linear") -> None:
        self.members: list[Linear] = [first]
        self.active = False
        self._pending: tuple | None = None  # (weakref to x, x._version, {id(member): output})

    def __getstate__(self) -> dict:  # picklable (torch.save of a whole model): drop the in-flight outputs
        return {"members": self.members, "active": self.active, "_pending": None}

    def output(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor | None:
        pend = self._pending
        if pend is not None and pend[0]() is x and pend[1] == x._version and id(layer) in pend[2]:
            out = pend[2].pop(id(layer))
            if not pend[2]:
                self._pending = None
            return out
        if layer is not self.members[0]:
            return None
        self._pending = None
        if not self.active:
            if _graph_task_id() != -1:  # inside backward (a checkpoint recompute): stay as before
                return None
            self.active = True
        specs = []
        for m in self.members:
            f = m._fast_args(x)
            if f is None or m.in_features != layer.in_features or not (
                    isinstance(f[5], nn.Identity) or not f[5].training):
                return None
            specs.append(f[:5])
        outs = lora_group_linear(x, specs)
        self._pending = (weakref.ref(x), x._version, {id(m): o for m, o in zip(self.members[1:], outs[1:])})
        return outs[0]


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: 0)  # -1 outside backward
_LAST_CALL: list = [None, None]  # (weakref to the last fast-path input, weakref to its layer)


def _learn_sharing(layer: "Linear", x: torch.Tensor) -> None:
    last_x, last_layer = _LAST_CALL
    prev = last_layer() if last_layer is not None else None
    if prev is not None and prev is not layer and last_x() is x and prev.in_features == layer.in_features:
        group = prev.__dict__.get("_share")
        if group is None:
            group = prev.__dict__["_share"] = _SharedInput(prev)
        if layer not in group.members and not group.active:
            group.members.append(layer)
            layer.__dict__["_share"] = group
    _LAST_CALL[0], _LAST_CALL[1] = weakref.ref(x), weakref.ref(layer)
