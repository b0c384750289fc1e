"""One forward per preference pair: the prompt once, the chosen and rejected completions beside it.

TRL (and the padded layout in pairs.py) runs [prompt + chosen; prompt + rejected] as two rows, so
every prompt token goes through the model twice, plus the pads of the longer row. When the answers
are short (the default task's one word after a 60-token prompt) that is nearly twice the work. Here
a pair is one row

    tokens     p0 .. p(P-1)  c0 .. c(C-1)  r0 .. r(R-1)   pads
    positions  0  .. P-1     P  .. P+C-1   P  .. P+R-1    0
    attention  causal, except that rejected tokens do not see the chosen ones (a (B,1,L,L) mask)

so the rejected tokens see exactly what they see in their own row (the prompt, then themselves, at
the same RoPE positions): the log-probs are the padded layout's to float rounding
(tests/test_objective_fast.py). The last prompt position predicts both c0 and r0. The decoder then
runs the LM head only at the P-1 + C + R - 1 positions that predict a completion token, as the
job's SFT path does (lm.py): `F.linear_cross_entropy` per token in fp32, chunks of the logits
recomputed in backward under autocast, so no (tokens x vocab) tensor is kept.

The frozen prefix once per step: when the adapters start at block k (the job's CPU default adapts
the top third) and nothing below block k trains or draws random numbers, block k's input is the same
for the policy and the adapter-off reference. DPO / IPO then run the reference's full forward
(no_grad), keep block k's input from it, and run the policy from block k (`Prefix`); checked once
against the full forward, and off with a logged message where they disagree (a model that rescales
its input embeddings inside the forward).

It applies where the job's fast loss applies (kernels/chunked_ce.chunked_ce_status: a plain
lm_head(hidden), no hooks on the forward, so not prompt / prefix tuning) and the attention takes a
custom 4D mask (sdpa or eager); elsewhere the objective runs the padded layout, and the job's log
says which and why.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.chunked_ce import CHUNK_ROWS, chunked_ce_status
from .base import reference

MASKS = ("sdpa", "eager")  # attention implementations that read a custom (B, 1, L, L) mask


def status(model: nn.Module) -> tuple[bool, str]:
    """(applies, why) for the one-row-per-pair layout on `model` (a PeftModel or a plain model)."""
    ok, why = chunked_ce_status(model)
    if not ok:
        return False, why
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(inner.config, "_attn_implementation", None)
    if impl not in MASKS:
        return False, f"attention {impl!r} takes no custom 4D mask (sdpa or eager do)"
    return True, "prompt once per pair, chosen and rejected beside it (one row), the head only at completion tokens"


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """The pairs as one row each. Besides the model's inputs: `tgt_pos` (K,) flat positions in
    (B*L) whose next token is a completion token, `tgt_ids` (K,) those tokens, `tgt_seq` (K,) which
    of the 2B completions (chosen rows first, then rejected, as the padded layout orders them)
    each belongs to, and `n_tokens` (2B,) completion lengths."""
    B = len(examples)
    lens = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    L = max(lens)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 pad
    tp, tt, ts = [], [], []
    for i, e in enumerate(examples):
        p, c, r = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
        P, C, R = len(p), len(c), len(r)
        ids[i, :P + C + R] = torch.tensor(p + c + r, dtype=torch.long)
        pos[i, :P + C] = torch.arange(P + C)
        pos[i, P + C:P + C + R] = torch.arange(P, P + R)
        seg[i, :P], seg[i, P:P + C], seg[i, P + C:P + C + R] = 0, 1, 2
        base = i * L
        # chosen: positions P-1 .. P+C-2 predict c0 .. c(C-1); rejected: P-1 predicts r0, then P+C .. P+C+R-2
        tp += [base + P - 1 + k for k in range(C)] + ([base + P - 1] if R else []) + \
              [base + P + C + k for k in range(R - 1)]
        tt += c + r
        ts += [i] * C + [B + i] * R
    allowed = segment_mask(seg, pad=3)
    n = torch.tensor([len(e["chosen_ids"]) for e in examples] + [len(e["rejected_ids"]) for e in examples])
    return {"input_ids": ids, "position_ids": pos, "pair_mask": allowed.unsqueeze(1),
            "attention_mask": (seg != 3).long(),  # the real tokens (what the trainer counts), not the model's mask
            "tgt_pos": torch.tensor(tp, dtype=torch.long), "tgt_ids": torch.tensor(tt, dtype=torch.long),
            "tgt_seq": torch.tensor(ts, dtype=torch.long), "n_tokens": n.clamp(min=1).float()}


def _decoder(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()


class Prefix:
    """Blocks 0..k-1 once per step for the policy and the reference (see the module's docstring)."""

    def __init__(self, model: nn.Module, log=print) -> None:
        from ..prefix_cache import block_list, first_trained_block

        self.decoder = _decoder(model)
        self.k, self.why = first_trained_block(model, self.decoder)
        found = block_list(self.decoder)
        self.name, self.blocks = found if found is not None else (None, None)
        if self.blocks is None:
            self.k = 0
        self.checked = False
        self.log = log

    @property
    def on(self) -> bool:
        return self.k > 0

    def reference_with_input(self, ref_model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) reference log-probs (the caller switches the adapters off) and block k's input."""
        kept: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            kept.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = self.blocks[self.k].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            ref = seq_logps(ref_model, batch)
        finally:
            handle.remove()
        return ref, kept[0]

    def policy_from(self, model: nn.Module, batch: dict[str, Any], h: torch.Tensor) -> torch.Tensor:
        """(2B,) policy log-probs running blocks k.. from block k's input `h`; the first call is
        checked against the full forward (a mismatch turns the share off, logged)."""
        if not self.checked:
            self.checked = True
            with torch.no_grad():
                full, cut = seq_logps(model, batch), self._run(model, batch, h)
            if not torch.allclose(full.float(), cut.float(), rtol=1e-3, atol=1e-3):
                k, self.k = self.k, 0
                self.log(f"loss: starting the policy at block {k} gave log-probs {float((full - cut).abs().max()):.2e} "
                         "away from the full forward (this model computes its blocks' input differently); the policy "
                         "runs every block")
                return seq_logps(model, batch)
        return self._run(model, batch, h)

    def _run(self, model: nn.Module, batch: dict[str, Any], h: torch.Tensor) -> torch.Tensor:
        setattr(self.decoder, self.name, self.blocks[self.k:])
        try:
            return seq_logps(model, batch, inputs_embeds=h)
        finally:
            setattr(self.decoder, self.name, self.blocks)


def _mask(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """The mask as the attention reads it: bool for sdpa, additive for eager."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if inner.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def token_logps(model: nn.Module, batch: dict[str, Any], inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) log-probability of each completion token (batch['tgt_ids']) given what precedes it
    (`inputs_embeds`: the input of the decoder's first block, when the caller has cut its blocks)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    ids = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch["input_ids"]}
    h = decoder(**ids, attention_mask=_mask(model, batch["pair_mask"]), position_ids=batch["position_ids"],
                use_cache=False).last_hidden_state
    hs = h.reshape(-1, h.shape[-1]).index_select(0, batch["tgt_pos"])
    tgt = batch["tgt_ids"]
    w, b = head.weight, head.bias
    if hs.dtype == torch.float32 and not torch.is_autocast_enabled(hs.device.type):
        opts = nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK_ROWS)
        return -F.linear_cross_entropy(hs, w, tgt, linear_bias=b, reduction="none", options=opts)
    from torch.utils.checkpoint import checkpoint  # half precision: fp32 logits a chunk at a time, recomputed

    def chunk(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(F.linear(hc, w, b).float(), tc, reduction="none")

    parts = [checkpoint(chunk, hs[i:i + CHUNK_ROWS], tgt[i:i + CHUNK_ROWS], use_reentrant=False)
             for i in range(0, len(hs), CHUNK_ROWS)]
    return torch.cat(parts) if parts else hs.new_zeros(0, dtype=torch.float32)


def seq_logps(model: nn.Module, batch: dict[str, Any], inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(2B,) summed completion log-probs: chosen rows, then rejected rows."""
    tok = token_logps(model, batch, inputs_embeds)
    n = len(batch["n_tokens"])
    return torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, batch["tgt_seq"], tok)


def segment_mask(seg: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, L) segment ids (0 the prompt, one id per completion, `pad` for padding) -> (B, L, L) bool:
    causal, each completion seeing the prompt and its own earlier tokens, nobody seeing padding (a pad
    query sees itself: never read, keeps the softmax finite). The one-row layouts' attention."""
    L = seg.shape[1]
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & ((k == 0) | (k == q)) & (k != pad)
    return allowed | torch.eye(L, dtype=torch.bool)


# ---- GRPO: a prompt and its group of completions in one row ------------------------------------------
#
# GRPO's loss forward runs N prompts x G sampled completions. As G rows each, every prompt token goes
# through the model G times (plus the pads of the longest completion); here a prompt and its G
# completions are one row, each completion at the positions it has in its own row and seeing only the
# prompt and its own earlier tokens:
#
#     tokens     p0 .. p(P-1)  a0 .. a(A-1)  b0 .. b(B-1)  ...   pads
#     positions  0  .. P-1     P  .. P+A-1   P  .. P+B-1   ...   0
#     attention  causal within the prompt and within each completion; a completion sees the prompt
#
# so its log-probs are the G-row layout's to float rounding (tests/test_objective_fast.py). A
# completion is its tokens up to the mask's last 1 (GRPO's mask: up to and including the first EOS).


def group_collate(prompt_ids: list[list[int]], comp: torch.Tensor, cmask: torch.Tensor, group: int,
                  pad_id: int) -> dict[str, Any]:
    """N prompts (token lists) and their N*group completions ((N*group, C) ids and 0/1 mask, prompt
    i's completions at rows i*group .. i*group+group-1) as N rows, with the keys token_logps reads
    (`input_ids`, `position_ids`, `pair_mask`, `tgt_pos`, `tgt_ids`) and `tgt_flat` (K,): where each
    target's log-prob goes in the flattened (N*group, C) completion grid."""
    N, C = len(prompt_ids), comp.shape[1]
    comp, cmask = comp.cpu(), cmask.cpu().bool()
    lens = cmask.sum(1)  # (N*G,) completion lengths (the mask is a prefix of each row)
    plen = torch.tensor([len(p) for p in prompt_ids])
    row_len = plen + lens.view(N, group).sum(1)
    L = int(row_len.max())
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    pos = torch.zeros((N, L), dtype=torch.long)
    seg = torch.full((N, L), -1, dtype=torch.long)  # 0 prompt, j+1 completion j, -1 pad
    # where each completion starts in its row: after the prompt and the earlier completions of its group
    starts = plen.repeat_interleave(group) + (lens.view(N, group).cumsum(1) - lens.view(N, group)).reshape(-1)
    row = torch.arange(N).repeat_interleave(group)  # (N*G,) the row of each completion
    for i, p in enumerate(prompt_ids):  # the prompts: N short copies
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        pos[i, :len(p)] = torch.arange(len(p))
        seg[i, :len(p)] = 0
    r, k = cmask.nonzero(as_tuple=True)  # every completion token: (completion r, column k), row-major
    col = starts[r] + k  # its column in the packed row
    ids[row[r], col] = comp[r, k]
    pos[row[r], col] = plen[row[r]] + k
    seg[row[r], col] = (r % group) + 1
    # token k of completion r is predicted at the prompt's last position (k = 0) or at its own token k-1
    pred = torch.where(k == 0, plen[row[r]] - 1, col - 1)
    allowed = segment_mask(seg, pad=-1)
    return {"input_ids": ids, "position_ids": pos, "pair_mask": allowed.unsqueeze(1),
            "tgt_pos": row[r] * L + pred, "tgt_ids": comp[r, k], "tgt_flat": r * C + k}


def group_logps(model: nn.Module, batch: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    """(N*group, C) per-token completion log-probs from a group_collate batch, zero outside the
    completions: the same tensor as base.completion_logps' completion columns on the G-row layout."""
    tok = token_logps(model, batch)
    out = torch.zeros(shape[0] * shape[1], dtype=tok.dtype, device=tok.device)
    return out.index_put((batch["tgt_flat"],), tok).view(shape)


# ---- unpaired rows (KTO): a completion and the KL term's mismatched completion beside the prompt ----

def collate_unpaired(examples: list[dict[str, Any]], kl_completions: list[list[int]], pad_id: int) -> dict[str, Any]:
    """KTO's rows in the one-row layout: the prompt once, the row's completion beside it and, in the
    place of a rejected answer, the KL term's mismatched completion (another row's), which does not
    see the first. `seq_logps` of the batch: (2B,) the completions, then the KL completions."""
    return collate([{"prompt_ids": e["prompt_ids"], "chosen_ids": e["completion_ids"], "rejected_ids": k}
                    for e, k in zip(examples, kl_completions)], pad_id)


def policy_and_reference(model: nn.Module, ref_model: nn.Module, batch: dict[str, Any],
                         prefix: "Prefix | None") -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) policy log-probs and (2B,) fp32 reference log-probs (adapters off, no gradient) of a
    one-row batch. With the frozen prefix on, the reference runs first and the policy starts from
    its block-k input, so blocks 0..k-1 run once for both."""
    if prefix is not None and prefix.on:
        with reference(ref_model):
            ref, h = prefix.reference_with_input(ref_model, batch)
        return prefix.policy_from(model, batch, h), ref.float()
    with reference(ref_model):
        ref = seq_logps(ref_model, batch).float()
    return seq_logps(model, batch), ref
