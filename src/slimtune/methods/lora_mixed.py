"""LoRA linears in a mixed-adapter batch: each row with its own adapter (or none), one forward.

`tuner.mixed_batch(names)` sets `layer._mixed = (distinct names, row -> name index)` on every
adapter layer; `Linear.forward` then calls `_mixed_forward` here. Serving (no gradients) works from
one stack of every adapter of the layer (`_all_stacks`, rebuilt only when an adapter changes) and a
plan per batch (`_mixed_plan`, kept across the batch's decode steps); training on mixed batches
gathers each row's weights from the parameters so gradients reach them (`_stacks_for_grad`).
Kept apart from lora_layers.py: the layers say what LoRA is, this says how many adapters share a
batch.
"""
from __future__ import annotations

import torch

from ..kernels import lora_rows

BASE_ADAPTER = "__base__"  # name for "no adapter" rows in a mixed batch


class MixedLinear:
    """Mixed-batch methods of lora_layers.Linear (a mixin: it reads the layer's lora_A / lora_B /
    scaling / r, in_features / out_features and base_layer)."""

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row adapters in one batch. x (B, T, in) -> (B, T, out).

        Serving (no gradients): rows are grouped by adapter and each adapter in the batch is read
        once, from the layer's stack of every adapter (`_all_stacks`), by two batched GEMMs over
        the groups; see `_mixed_plan`. Rows with the same adapter share its weights, rows of the
        base model ("__base__") or of an adapter this layer lacks skip the LoRA part.

            out = base(x);  out[rows of a] += (x[rows of a] · A_aᵀ) · (s_a·B_a)ᵀ   for each adapter a

        A batch entered with `weights_dtype` (the server's `--mixed-adapter-dtype bfloat16`) keeps
        its stack in that dtype: half the bytes of fp32 adapters per decode step. It is storage only:
        the weights are widened to x's dtype as they are read (promote_types: bf16 under an fp32
        model computes in fp32), so only the weights' own rounding differs from the default, the
        same in prefill as in the decode kernel. Off unless asked: the default keeps x's dtype.

        Decode steps (one token a row, fp32) take the lora_rows kernel while it is enabled (the
        server's `--lora-kernel`, kernels/lora_rows.py): one call per layer reads each row's A and
        s·B from the whole stack by the row's slot, with no grouping, copies or reordering. So do
        prefills (T tokens a row) where the build runs that rank's prefills (AVX-512 builds,
        `lora_rows.prefill_ranks`): no widened copy of a bf16 stack, no grouped input.

        With gradients (training on mixed batches) each row's (A, s·B) is gathered from the
        parameters so autograd reaches them, and the same two bmm run per row.
        """
        out = self.base_layer(x)
        d = self.__dict__
        mixed = d["_mixed"]
        hot = d.get("_mixed_hot")
        if hot is not None and hot[0] is mixed and x.shape[1] == 1 and not torch.is_grad_enabled():
            # a later decode step of the batch whose first step took the kernel: the same stack and
            # slots, straight to the kernel (the checks below cost ~14 µs a layer, 3 ms a step)
            k = lora_rows.op()
            if k is not None and x.dtype == torch.float32 and x.is_contiguous():
                k(x, hot[1], hot[2], hot[3], out)
                return out
        names, idx = mixed
        if torch.is_grad_enabled() and any(self.lora_A[n].weight.requires_grad or self.lora_B[n].weight.requires_grad
                                           for n in names if n != BASE_ADAPTER and n in self.scaling):
            held = [(i, n) for i, n in enumerate(names) if n != BASE_ADAPTER and n in self.scaling]
            ws = [(self.lora_A[n].weight, self.lora_B[n].weight) for _, n in held]
            a_rows, b_rows = self._stacks_for_grad(names, idx, held, ws, x.dtype)  # (B, in, r), (B, r, out)
            n = a_rows.shape[0]
            xa = torch.bmm(x.reshape(n, -1, self.in_features), a_rows)  # (B, T, r)
            return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), xa, b_rows).view(out.shape)
        # the stack's dtype: x's, or the one the batch asked for (`mixed_batch(weights_dtype=...)`)
        wd = d.get("_mixed_dtype") or x.dtype
        plan = self._mixed_plan(wd)
        if plan is None:
            return out
        a_u, b_u, sel, pos, m, (a_all, b_all, slots) = plan  # (G, in, r), (G, r, out); rows (K,) or None = all;
        #                                                       their group slots; the whole stack, each row's slot
        n = idx.shape[0]
        x3 = x.reshape(n, -1, self.in_features)  # (B, T, in)
        if lora_rows.usable(x3, out, a_all):  # one kernel call, straight from the stack (no grouping, no copies)
            if x3.shape[1] == 1:  # a decode step: its later steps go straight to the kernel (above)
                lora_rows.add_rows(x3.reshape(n, self.in_features), a_all, b_all, slots, out.view(n, -1))
                d["_mixed_hot"] = (mixed, a_all, b_all, slots)
            else:  # a prefill: each row's tokens through its adapter, in token blocks
                lora_rows.add_rows(x3, a_all, b_all, slots, out.view(n, x3.shape[1], -1))
            return out
        # the arithmetic's dtype: a narrower stack (bf16 under an fp32 model) is widened as it is read,
        # as the kernel does in registers; torch's bf16 bmm on the CPU ran 1.5-2x slower than widening
        # the batch's weights and multiplying in fp32 (prefill shapes, AMX CPU, 2 threads)
        cd = torch.promote_types(wd, x3.dtype)
        if a_u.dtype != cd:
            a_u, b_u = a_u.to(cd), b_u.to(cd)
        if x3.dtype != cd:
            x3 = x3.to(cd)
        out3 = out.view(n, -1, out.shape[-1])  # (B, T, out)
        if pos is None:  # row i is group i: no reordering
            xa = torch.bmm(x3, a_u)  # (B, T, r)
            if cd == out.dtype:
                out3.baddbmm_(xa, b_u)
            else:
                out3.add_(torch.bmm(xa, b_u))
            return out
        g, t = a_u.shape[0], x3.shape[1]
        xs = x3 if sel is None else x3.index_select(0, sel)
        xg = x3.new_zeros(g * m, t, self.in_features).index_copy_(0, pos, xs)
        xa = torch.bmm(xg.view(g, m * t, self.in_features), a_u)  # (G, M·T, r)
        y = torch.bmm(xa, b_u).view(g * m, t, -1).index_select(0, pos).to(out.dtype)  # (K, T, out)
        if sel is None:
            out3.add_(y)
        else:
            out3.index_add_(0, sel, y)
        return out

    def _mixed_plan(self, dtype: torch.dtype):
        """How the mixed batch in place meets this layer's adapters:

            (A_g (G, in, r_max), s·B_g (G, r_max, out), sel, pos, M, (A_all, s·B_all, slots)) or None
            when no row has an adapter of this layer

        The groups G are either the layer's whole stack (a view: no copy) or the batch's U distinct
        adapters gathered from it; M = the most rows one adapter has; row sel[k] (sel None: row k)
        is row pos[k] of the (G·M)-row grouped input; pos None: row i is group i (the rows are the
        stack's slots in order, or their weights gathered in row order). Which one: `_row_plan`.
        The row plan is shared by the layers with the same adapters (worked out once per batch),
        the weights are never copied when the batch uses most of the stack, and this layer keeps
        its last plans by the rows' slots, so a batch that comes back (the decode batch after a
        prefill, a row leaving and joining) finds its plan again. The last item is what the decode
        kernel reads: the layer's whole stack and each row's slot in it (0: no adapter)."""
        mixed = self._mixed
        d = self.__dict__
        last = d.get("_mixed_last")
        if last is not None and last[0] is mixed and last[1] == dtype:
            return last[2]
        names, idx = mixed
        plan = None
        if any(n != BASE_ADAPTER and n in self.scaling for n in names):
            slots, a_all, b_all = self._all_stacks(dtype)
            rp = _row_plan(mixed, tuple(slots.get(n, 0) for n in names), a_all.shape[0] - 1)
            held = d.setdefault("_mixed_cache", {})
            got = held.get((rp.key, dtype))
            if got is not None and got[0] is a_all:
                plan = got[1]
            else:
                full = (a_all, b_all, rp.slots)
                if rp.kind == "view":  # rows = consecutive slots in order: a slice of the stack
                    lo, hi = rp.span
                    plan = (a_all[lo:hi], b_all[lo:hi], None, None, 1, full)
                elif rp.kind == "stack":  # the whole stack, no copy
                    plan = (a_all[1:], b_all[1:], rp.sel, rp.pos, rp.m, full)
                else:  # "gather": each used adapter's weights copied once, in group order
                    plan = (a_all.index_select(0, rp.used), b_all.index_select(0, rp.used), rp.sel, rp.pos, rp.m,
                            full)
                if len(held) >= _PLANS_KEPT:
                    del held[next(iter(held))]
                held[(rp.key, dtype)] = (a_all, plan)
        d["_mixed_last"] = (mixed, dtype, plan)
        return plan

    def _all_stacks(self, dtype: torch.dtype) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        """({adapter: slot}, A (S+1, in, r_max), s·B (S+1, r_max, out)) over every LoRA adapter of the
        layer, slot 0 zeros (base rows); ranks below r_max zero-padded (and r_max itself up to a rank
        the decode kernel is compiled for while it is on: `lora_rows.padded_rank`). Kept while the
        adapters' tensors (pointer and version) and scalings stay the same, or, for a batch with an
        epoch (MixedRows.epoch), while the epoch is the one the stack was checked under."""
        held = self.__dict__.get("_mixed_all")
        epoch = getattr(self._mixed, "epoch", None)
        trust = None if epoch is None else (epoch, dtype, lora_rows.active())  # the rank padding follows the kernel
        if trust is not None and held is not None and held[2] == trust:
            return held[1]
        # read through the modules' own dicts: this runs on every layer each time a new mixed batch
        # comes in (a row joins or leaves), and nn.Module.__getattr__ made it ~20 ms per batch
        la, lb, sc = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules, self.scaling
        names = [n for n in la if n in sc]
        ws = [(la[n]._parameters["weight"], lb[n]._parameters["weight"]) for n in names]
        rmax = max(self.r[n] for n in names)
        if lora_rows.active():
            rmax = lora_rows.padded_rank(rmax)
        key = (dtype, rmax, tuple(names), tuple(sc[n] for n in names),
               tuple([t for a, b in ws for t in (a.data_ptr(), a._version, b.data_ptr(), b._version)]))
        if held is not None and held[0] == key:
            self.__dict__["_mixed_all"] = (key, held[1], trust)
            return held[1]
        a_all = ws[0][0].new_zeros(len(names) + 1, self.in_features, rmax, dtype=dtype)
        b_all = ws[0][0].new_zeros(len(names) + 1, rmax, self.out_features, dtype=dtype)
        for s, (n, (a, b)) in enumerate(zip(names, ws), 1):
            a_all[s, :, : self.r[n]] = a.t()
            b_all[s, : self.r[n]] = (b * self.scaling[n]).t()
        out = ({n: s for s, n in enumerate(names, 1)}, a_all, b_all)
        self.__dict__["_mixed_all"] = (key, out, trust)
        return out

    def _stacks_for_grad(self, names, idx, held, ws, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The same gathered weights built from the parameters themselves, so gradients reach them."""
        rmax = max(self.r[n] for _, n in held)
        if len(held) == len(names) and all(self.r[n] == rmax for _, n in held):
            a_stack = torch.stack([a for a, _ in ws])  # (n_adapters, r, in)
            b_stack = torch.stack([b * self.scaling[n] for (_, b), (_, n) in zip(ws, held)])  # (n_adapters, out, r)
        else:
            a_stack = ws[0][0].new_zeros(len(names), rmax, self.in_features)
            b_stack = ws[0][0].new_zeros(len(names), self.out_features, rmax)
            for (i, n), (a, b) in zip(held, ws):
                a_stack[i, : self.r[n]] = a
                b_stack[i, :, : self.r[n]] = b * self.scaling[n]
        return a_stack.to(dtype)[idx].transpose(1, 2), b_stack.to(dtype)[idx].transpose(1, 2)


_PLANS_KEPT = 4  # plans a layer keeps (by the rows' slots): the decode batch, a prefill, a batch a row left


class MixedRows(tuple):
    """A mixed batch as the layers see it: (distinct names, row -> name index), plus the row plans
    the batch's layers share (`plans`, by the slots of the names; `_row_plan`) and the caller's
    `epoch` (tuner.mixed_batch's weights_epoch: while it stays the same, the adapters have not
    changed, so `_all_stacks` skips its per-tensor check; None: always check)."""

    def __new__(cls, names: list[str], idx: torch.Tensor, epoch=None) -> "MixedRows":
        self = super().__new__(cls, (names, idx))
        self.plans, self.epoch = {}, epoch
        return self


class RowPlan:
    """Where each row of a mixed batch goes, for layers whose stack has `n_slots` adapters:

    kind  "view": the rows are consecutive slots in order, `span` = (first, last + 1): row i is
          group i of that slice of the stack; "stack": the groups are the stack's slots (read in
          place); "gather": the groups are the U adapters the batch uses, their weights copied
          once per layer (one row per adapter: in row order, `used` = the rows' slots, pos None)
    used  (U,) the slots the batch uses, ascending (the "gather" groups)
    sel   (K,) the rows with an adapter (None: every row), pos (K,) their rows of the grouped input
          (group * M + rank within the group; None: row i is group i), m = M
    key   the slot of each row (a tuple): a layer's plans are kept by it
    slots (B,) int64, the same as a tensor: what the decode kernel reads"""

    __slots__ = ("kind", "used", "sel", "pos", "m", "key", "span", "slots")


def _row_plan(mixed, name_slots: tuple[int, ...], n_slots: int) -> RowPlan:
    """The row plan of a batch for a stack of `n_slots` adapters whose slot for names[i] is
    name_slots[i] (0: none). Shared through `mixed.plans` by every layer with the same slots (a
    MixedRows batch); a plain (names, idx) tuple gets a fresh one.

    The stack is read in place (no copy) when the rows are its slots in order (pos None) or when
    the batch uses more than half its adapters: then the rows are scattered into the stack's
    slot order (zero rows for the unused slots; the GEMMs read the whole stack, which the batch
    mostly reads anyway) instead of copying most of the stack into the rows' order at every
    change of the batch (a row joining or leaving). A batch of few adapters copies those."""
    plans = getattr(mixed, "plans", None)
    key = (name_slots, n_slots)
    if plans is not None and key in plans:
        return plans[key]
    names, idx = mixed
    dev = idx.device
    rows = torch.tensor(name_slots, device=dev)[idx]  # (B,) slot per row
    has = rows > 0
    used, group = torch.unique(rows[has], sorted=True, return_inverse=True)  # (U,), (K,)
    u, k, b = used.shape[0], int(has.sum()), rows.shape[0]
    rp = RowPlan()
    rp.key, rp.used, rp.span, rp.slots = tuple(rows.tolist()), used, None, rows
    rp.sel = None if k == b else has.nonzero().flatten()
    if u == 0:
        rp.kind, rp.pos, rp.m = "stack", None, 1
    else:
        counts = torch.bincount(group, minlength=u)  # rows per adapter
        rp.m = int(counts.max())
        # rank of each row within its group: its position among the group's rows (stable order)
        order = torch.argsort(group, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(group)
        rank[order] = torch.arange(k, device=dev) - starts[group[order]]
        first = rp.key[0]
        if rp.m == 1 and k == b and rp.key == tuple(range(first, first + b)):
            rp.kind, rp.pos, rp.span = "view", None, (first, first + b)  # no copy, no reordering
        elif 2 * u > n_slots:
            rp.kind, rp.pos = "stack", (rows[has] - 1) * rp.m + rank
        elif rp.m == 1 and k == b:
            # one row per adapter: gather the weights in row order, so a step runs no reordering op
            rp.kind, rp.used, rp.pos = "gather", rows, None
        else:
            rp.kind, rp.pos = "gather", group * rp.m + rank
    if plans is not None:
        plans[key] = rp
    return rp
