"""Property checks every method's tests share (HF PEFT's style): merge equivalence, save/load
round trip, merge_and_unload leaves a plain model, training moves only declared parameters."""
from __future__ import annotations

import torch
from conftest import logits

from slimtune import PeftModel
from slimtune.inject import AdapterLayer, ModulesToSaveWrapper


def perturb_adapter(pm, seed: int = 0, std: float = 0.3) -> None:
    """Add noise to every floating tensor the adapter saves, so it changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in pm.get_adapter_state_dict().values():
            if v.is_floating_point():
                v.add_(std * torch.randn(v.shape, generator=g))


def check_merge_unmerge(pm, make, x) -> torch.Tensor:
    """Adapter changes outputs; merged == unmerged == after unmerge. Returns the reference logits."""
    with torch.no_grad():
        ref = logits(pm, x)
        assert (ref - logits(make(), x)).abs().max() > 1e-3 * ref.abs().max()  # the adapter does something
        pm.merge_adapter()
        torch.testing.assert_close(logits(pm, x), ref, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(logits(pm, x), ref, atol=1e-5, rtol=1e-5)
    return ref


def check_merge_and_round_trip(pm, make, x, tmp_path, load_atol: float = 0.0):
    """`check_merge_unmerge`; saved + loaded == live (to `load_atol`); merge_and_unload gives a
    plain model with the same outputs. Returns the reference logits."""
    ref = check_merge_unmerge(pm, make, x)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, x), ref, atol=load_atol, rtol=load_atol)
        plain = loaded.merge_and_unload()
        assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
        torch.testing.assert_close(logits(plain, x), ref, atol=1e-5, rtol=1e-5)
    return ref


def train_steps(pm, batch: dict, steps: int = 6, lr: float = 1e-2, opt_cls=torch.optim.AdamW,
                seed: int | None = None) -> tuple[list[float], set[str]]:
    """A few optimizer steps on `pm(**batch).loss`; returns (losses, names of parameters that changed).
    Leaves the model in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    before = {k: p.detach().clone() for k, p in pm.named_parameters()}
    opt = opt_cls([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pm.eval()
    return losses, {k for k, p in pm.named_parameters() if not torch.equal(before[k], p)}


def train_lm_steps(pm, ids, steps: int = 6, lr: float = 1e-2) -> tuple[list[float], set[str]]:
    """Causal-LM loss on `ids` (labels = inputs)."""
    return train_steps(pm, {"input_ids": ids, "labels": ids}, steps, lr)


@torch.no_grad()
def greedy_by_forward(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by one full forward per token (no KV cache, positions from the padding
    mask as generate computes them): the reference a cached `generate` must reproduce, and one
    that does not depend on any library's generation code. (B, T) -> (B, T + new_tokens)."""
    for _ in range(new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids
