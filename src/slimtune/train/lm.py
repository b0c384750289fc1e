"""The causal-LM forward the job trains and evaluates with: the decoder, then the head only where a
label is.

    lm = CausalLMPath.build(model, train_cfg, data, processes, device, out, log)   # or None + a logged why
    batch = lm.collate(examples)                 # padding-free (packing.py) or right-padded rows
    loss = lm.loss(batch, "train", ids)          # == model(**padded batch).loss, checked on the first batch
    h = lm.hidden(batch, "eval", ids).last_hidden_state ; s, n = lm.loss_sum(h, labels)

Where the time goes in the stock `model(**batch).loss`, and what this path does instead:

- **The head at labelled positions only.** The LM head (49152 × 576 for SmolLM2, as many FLOPs per
  token as 8 of its 30 blocks) runs for every token, but an instruction or chat example has labels
  on its answer only: 2.8% of the default job's tokens, 29% of the chatterbot example's. The
  hidden states at the labelled positions go through torch's chunked `F.linear_cross_entropy`
  (no logits kept, kernels/chunked_ce.py's measured chunk size), the mean over the same tokens as
  the model's own loss.
- **No pad tokens** (packing.py): training batches are flattened (transformers'
  DataCollatorWithFlattening), attention runs per row.
- **The frozen prefix once** (prefix_cache.py): later epochs and evaluations start at the first
  adapted block.
- **Right-padded rows without an attention mask** where rows are padded (evaluation): a row never
  attends to the pads after it under causal attention, so the mask is dropped and SDPA runs its
  causal kernel.

`train.chunked_ce: off` runs the model's own forward and loss instead (and with it no packing and
no prefix cache). The path applies to causal LMs whose logits are a plain `lm_head(hidden)`
(chunked_ce_status), on one process; "auto" uses it on CPU, where it was measured.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.chunked_ce import CHUNK_ROWS, chunked_ce_status
from . import packing
from .data import IGNORE, collate
from .prefix_cache import PrefixCache


class CausalLMPath:
    def __init__(self, model: nn.Module, pack: bool, log: Callable[[str], None], mode: str = "auto") -> None:
        self.model, self.mode = model, mode
        self.disabled = False  # auto, and the first batch disagreed with the model's own loss
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder, self.head = self.inner.get_decoder(), self.inner.get_output_embeddings()
        self.pack = pack
        self.prefix: PrefixCache | None = None
        self.log = log
        self.checked = False
        self.options = nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK_ROWS)
        from ..compat import cache_arg

        self.cache_kw = cache_arg(self.decoder) or "past_key_values"

    @classmethod
    def build(cls, model: nn.Module, t, data, processes: int, device: torch.device, out: Path | None,
              log: Callable[[str], None], will_reuse: dict[str, bool] | None = None) -> "CausalLMPath | None":
        """The path for this run, or None (the model's own loss) with the reason logged; raises
        ValueError for `chunked_ce: on` where it cannot apply."""
        mode = t.chunked_ce
        forced = [k for k in ("packing", "prefix_cache") if getattr(t, k) == "on"]
        if mode == "off":
            if forced:
                raise ValueError(f"train.{forced[0]}=on needs the job's loss path, which train.chunked_ce=off turns "
                                 f"off; set train.{forced[0]}=auto or train.chunked_ce=auto")
            log("loss: the model's own forward and loss (train.chunked_ce=off): logits for every token, no "
                "padding-free batches, no prefix cache")
            return None
        ok, why = chunked_ce_status(model)
        if ok and processes > 1:
            ok, why = False, "distributed training: the loss must run through the DDP/FSDP wrapper's forward"
        if ok and mode == "auto" and device.type != "cpu":
            ok, why = False, "train.chunked_ce=auto uses it on CPU only (on GPU, liger-kernel's fused ops)"
        if not ok:
            if mode == "on" or forced:
                key = "chunked_ce" if mode == "on" else forced[0]
                raise ValueError(f"train.{key}=on cannot apply: {why}; set train.{key}=auto or off")
            log(f"loss: the model's own forward and loss ({why})")
            return None
        pack, pack_why = packing.varlen_status(model)
        if t.packing == "off":
            pack, pack_why = False, "train.packing=off"
        elif pack and t.compile:
            pack, pack_why = False, "train.compile: every flattened batch has a new shape to compile"
        if t.packing == "on" and not pack:
            raise ValueError(f"train.packing=on cannot apply: {pack_why}; set train.packing=auto or off")
        lm = cls(model, pack, log, mode)
        parts = [f"{why}, the head only at labelled positions",
                 pack_why if pack else f"padded batches ({pack_why})"]
        reuse = will_reuse or {}
        if t.prefix_cache != "off" and any(reuse.values()):
            lengths = {"train": [len(e["input_ids"]) for e in data.train] if reuse.get("train") else [],
                       "eval": [len(e["input_ids"]) for e in data.eval] if reuse.get("eval") else []}
            folder = (out / ".prefix_cache") if out is not None else None
            lm.prefix, pwhy = PrefixCache.build(lm.decoder, model, lengths, t.prefix_cache_mb, folder, log)
            parts.append(f"prefix cache: {pwhy}" if lm.prefix else f"no prefix cache ({pwhy})")
        elif t.prefix_cache != "off":
            pwhy = "no example is seen twice (one epoch, one evaluation)"
            parts.append(f"no prefix cache ({pwhy})")
        if t.prefix_cache == "on" and lm.prefix is None:
            raise ValueError(f"train.prefix_cache=on cannot apply: {pwhy}; set train.prefix_cache=auto or off")
        log("loss: " + "; ".join(parts))
        return lm

    # ---- batches ---------------------------------------------------------------------------------
    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        return packing.packed(examples) if self.pack else collate(examples, pad_id)

    @staticmethod
    def model_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
        """What the decoder gets: the ids, and for flattened rows their positions and boundaries; a
        right-padded batch goes without its attention mask (causal rows never see their pads)."""
        return {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}

    def attention(self):
        """Context for the whole training loop: the model's attention is `varlen_sdpa` (per row for
        flattened batches, the stock SDPA for every other call), so that backward recomputation
        under gradient checkpointing runs the same attention as the forward."""
        return packing.varlen_attention(self.model) if self.pack else contextlib.nullcontext()

    def hidden(self, batch: dict[str, Any], split: str | None = None, ids: list[int] | None = None,
               use_cache: bool = False):
        """The decoder's output for a batch. Examples whose block-k input is kept start there (no KV
        cache then: `output.cache` is None); others run every block, keeping it when the cache
        holds their split."""
        args = self.model_kwargs(batch)
        pc = self.prefix if split is not None and self.prefix is not None and self.prefix.lengths.get(split) else None
        if packing.is_packed(batch) and packing.NAME != getattr(self.inner.config, "_attn_implementation", None):
            raise RuntimeError("a flattened batch needs the per-row attention: run it inside lm.attention()")
        if pc is not None and pc.has(split, ids):
            if not pc.checked:  # the first start from block k: against the full forward, once
                with torch.no_grad():
                    full = self.decoder(**args, use_cache=False).last_hidden_state
                if not pc.check(full, split, ids, batch, args):
                    return self.decoder(**args, use_cache=use_cache)
            return pc.run_from(split, ids, batch, args)
        with pc.capture(split, ids, batch) if pc is not None else contextlib.nullcontext():
            return self.decoder(**args, use_cache=use_cache)

    # ---- the head --------------------------------------------------------------------------------
    @staticmethod
    def targets(labels: torch.Tensor) -> torch.Tensor:
        """Next-token targets, flat: position t predicts labels[t + 1]; a row's last position (and, in
        a flattened batch, the position before the next row's -100 separator) predicts nothing."""
        return F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)

    def _ce(self, h: torch.Tensor, tgt: torch.Tensor, reduction: str) -> torch.Tensor:
        w, b = self.head.weight, self.head.bias
        if h.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
            return F.linear_cross_entropy(h, w, tgt, linear_bias=b, reduction=reduction, options=self.options)
        # half precision (autocast): the logits upcast to fp32 as the model's own loss does, a chunk at
        # a time and recomputed in backward, so no (rows × vocab) tensor is kept
        from torch.utils.checkpoint import checkpoint

        def chunk(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(F.linear(hc, w, b).float(), tc, reduction="sum")

        total = sum(checkpoint(chunk, h[i:i + CHUNK_ROWS], tgt[i:i + CHUNK_ROWS], use_reentrant=False)
                    for i in range(0, len(h), CHUNK_ROWS))
        return total / max(len(h), 1) if reduction == "mean" else total

    def labelled(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, targets) at the positions that have a target."""
        tgt = self.targets(labels)
        keep = (tgt != IGNORE).nonzero().squeeze(1)
        return h.reshape(-1, h.shape[-1]).index_select(0, keep), tgt.index_select(0, keep)

    def loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        hs, tgt = self.labelled(h, labels)
        return self._ce(hs, tgt, "sum"), len(tgt)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of a few rows of hidden states (rows × vocab)."""
        return self.head(h)

    # ---- training ----------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], split: str, ids: list[int], examples: list[dict[str, Any]],
             pad_id: int) -> torch.Tensor:
        """The mean next-token loss over the batch's labelled tokens. The first batch is checked
        against the model's own loss on the same examples, right-padded: a mismatch is an error
        naming the fix (under "on"), or a logged switch to the model's own loss (under "auto")."""
        h = self.hidden(batch, split, ids).last_hidden_state
        hs, tgt = self.labelled(h, batch["labels"])
        out = self._ce(hs, tgt, "mean")
        if not self.checked:
            self.checked = True
            with torch.no_grad():
                ref = self.model(**{k: v.to(h.device) for k, v in collate(examples, pad_id).items()}).loss
            # under bf16 autocast rows round differently in a flattened batch: a looser check
            tol = 1e-3 if out.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type) else 2e-2
            if not torch.allclose(out.detach().float(), ref.float(), rtol=tol, atol=tol / 10):
                msg = (f"the job's loss gave {out.item():.6f} but the model's own loss is {ref.item():.6f} on the "
                       "first batch: this model computes its logits or attention differently")
                if self.mode == "on":
                    raise ValueError(msg + "; set train.chunked_ce=auto or off (the model's own loss)")
                self.log(f"loss: {msg}; using the model's own loss")
                self.disabled = True
                return self.model(**{k: v.to(h.device) for k, v in collate(examples, pad_id).items()}).loss
            self.log(f"loss: first batch {out.item():.6f} = model's own {ref.item():.6f}")
        return out

    def close(self) -> None:
        if self.prefix is not None:
            self.prefix.close()
