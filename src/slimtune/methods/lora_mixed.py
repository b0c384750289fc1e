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

        A batch entered with `weights_dtype` (the server's `--mixed-adapter-dtype bfloat16`) reads
        a stack in that dtype: half the bytes of fp32 adapters per decode step; x is cast to it, the
        products accumulate in fp32 inside the GEMM and are rounded to it before the add into the
        base output (in the base's dtype). Off unless asked: the default keeps x's dtype.

        With gradients (training on mixed batches) each row's (A, s·B) is gathered from the
        parameters so autograd reaches them, and the same two bmm run per row.
        """
        out = self.base_layer(x)
        names, idx = self._mixed
        if torch.is_grad_enabled() and any(self.lora_A[n].weight.requires_grad or self.lora_B[n].weight.requires_grad
                                           for n in names if n != BASE_ADAPTER and n in self.scaling):
            held = [(i, n) for i, n in enumerate(names) if n != BASE_ADAPTER and n in self.scaling]
            ws = [(self.lora_A[n].weight, self.lora_B[n].weight) for _, n in held]
            a_rows, b_rows = self._stacks_for_grad(names, idx, held, ws, x.dtype)  # (B, in, r), (B, r, out)
            n = a_rows.shape[0]
            xa = torch.bmm(x.reshape(n, -1, self.in_features), a_rows)  # (B, T, r)
            return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), xa, b_rows).view(out.shape)
        # the stack's dtype: x's, or the one the batch asked for (`mixed_batch(weights_dtype=...)`)
        wd = self.__dict__.get("_mixed_dtype") or x.dtype
        plan = self._mixed_plan(wd)
        if plan is None:
            return out
        a_u, b_u, sel, pos, m = plan  # (U, in, r), (U, r, out); rows (K,), their group slots (K,) or None
        u = a_u.shape[0]
        n = idx.shape[0]
        x3 = x.reshape(n, -1, self.in_features)  # (B, T, in)
        if wd != x3.dtype:
            x3 = x3.to(wd)
        out3 = out.view(n, -1, out.shape[-1])  # (B, T, out)
        t = x3.shape[1]
        if sel is None:  # row i is group i: no reordering
            xa = torch.bmm(x3, a_u)  # (B, T, r)
            if wd == out.dtype:
                out3.baddbmm_(xa, b_u)
            else:
                out3.add_(torch.bmm(xa, b_u))
            return out
        xg = x3.new_zeros(u * m, t, self.in_features).index_copy_(0, pos, x3.index_select(0, sel))
        xa = torch.bmm(xg.view(u, m * t, self.in_features), a_u)  # (U, M·T, r)
        y = torch.bmm(xa, b_u).view(u * m, t, -1)  # (U·M, T, out)
        out3.index_add_(0, sel, y.index_select(0, pos).to(out.dtype))
        return out

    def _mixed_plan(self, dtype: torch.dtype):
        """How the mixed batch in place meets this layer's adapters, worked out once per batch and
        kept while the same batch is in place (the engine keeps it across decode steps):

            (A_u (U, in, r_max), s·B_u (U, r_max, out), sel, pos, M) or None when no row has an
            adapter of this layer

        U = the batch's distinct adapters that this layer holds, M = the most rows one of them has.
        Row sel[k] is row pos[k] of the (U·M)-row grouped input (group pos // M); the U adapters are
        gathered once per batch. When every row has an adapter of its own (M = 1, no base rows: the
        bench's 16 clients on 16 adapters) sel is None and group i is row i: the weights are in row
        order, a view of the layer's stack (no copy) when the rows are its slots in order, else
        gathered once per batch, and a step runs no reordering op."""
        mixed = self._mixed
        cache = self.__dict__.get("_mixed_cache")
        if cache is not None and cache[0] is mixed and cache[1] == dtype:
            return cache[2]
        names, idx = mixed
        if not any(n != BASE_ADAPTER and n in self.scaling for n in names):
            plan = None
        else:
            slots, a_all, b_all = self._all_stacks(dtype)
            rows = torch.tensor([slots.get(n, 0) for n in names], device=idx.device)[idx]  # (B,) slot per row
            used, group = torch.unique(rows[rows > 0], sorted=True, return_inverse=True)  # (U,), (K,)
            sel = (rows > 0).nonzero().flatten()  # (K,) the rows with an adapter of this layer
            u, k = used.shape[0], sel.shape[0]
            counts = torch.bincount(group, minlength=u)  # rows per group
            m = int(counts.max())
            # rank of each row within its group: its position among the group's rows (stable order)
            order = torch.argsort(group, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.empty_like(group)
            rank[order] = torch.arange(k, device=idx.device) - starts[group[order]]
            pos = group * m + rank
            if m == 1 and k == rows.shape[0]:
                # every row its own adapter: the weights in row order, so a step runs no reordering op
                # (each is a parallel region; two per layer cost more than they save in this case)
                if u == a_all.shape[0] - 1 and bool((pos == torch.arange(k, device=idx.device)).all()):
                    plan = (a_all[1:], b_all[1:], None, None, 1)  # the stack itself, no copy
                else:
                    plan = (a_all.index_select(0, rows), b_all.index_select(0, rows), None, None, 1)
            else:  # rows share adapters, or base rows: each adapter read once, base rows skipped
                plan = (a_all.index_select(0, used), b_all.index_select(0, used), sel, pos, m)
        self.__dict__["_mixed_cache"] = (mixed, dtype, plan)
        return plan

    def _all_stacks(self, dtype: torch.dtype) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        """({adapter: slot}, A (S+1, in, r_max), s·B (S+1, r_max, out)) over every LoRA adapter of the
        layer, slot 0 zeros (base rows); ranks below r_max zero-padded. Kept while the adapters'
        tensors (pointer and version) and scalings stay the same."""
        names = [n for n in self.lora_A if n in self.scaling]
        ws = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in names]
        key = (dtype, tuple(names), tuple(self.scaling[n] for n in names),
               tuple((a.data_ptr(), a._version, b.data_ptr(), b._version) for a, b in ws))
        held = self.__dict__.get("_mixed_all")
        if held is not None and held[0] == key:
            return held[1]
        rmax = max(self.r[n] for n in names)
        a_all = ws[0][0].new_zeros(len(names) + 1, self.in_features, rmax, dtype=dtype)
        b_all = ws[0][0].new_zeros(len(names) + 1, rmax, self.out_features, dtype=dtype)
        for s, (n, (a, b)) in enumerate(zip(names, ws), 1):
            a_all[s, :, : self.r[n]] = a.t()
            b_all[s, : self.r[n]] = (b * self.scaling[n]).t()
        out = ({n: s for s, n in enumerate(names, 1)}, a_all, b_all)
        self.__dict__["_mixed_all"] = (key, out)
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
