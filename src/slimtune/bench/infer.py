"""Inference scenarios of the bench: single-adapter unmerged / merged / compiled forwards against
the base model, and mixed batches (each row its own adapter), timed round-robin like training."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from .core import Row, _sync
from .presets import Preset
from .scenarios import _peft_cfg, _slim_cfg


def _infer_times(model, x, p: Preset, n: int, cpu_sink: list | None = None, warmup: int | None = None, **kw
                 ) -> tuple[list[float], float | None, Any]:
    dev = p.device
    warmup = p.warmup if warmup is None else warmup
    model.eval()
    times = []
    cpu_sink = [] if cpu_sink is None else cpu_sink
    out = None
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(warmup + n):
            out = None
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(input_ids=x, **kw).logits
            _sync(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
                cpu_sink.append((time.process_time() - c0) * 1000)
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    model.train()
    return times, mem, out[:, -8:].float().clone()


def _infer_rows(model, x, p: Preset, checks: dict, compiled: bool = False) -> list[Row]:
    """Unmerged and merged single-adapter inference against the base model. Every round sets each
    scenario up again on the one model (PEFT and slimtune inject into it), so `p.infer_rounds` rounds
    interleave the scenarios and machine drift hits them alike; the same adapter weights go into both
    libraries, and round 0 checks their logits agree. `compiled` adds base and unmerged slimtune
    with every layer under torch.compile (compile_blocks)."""
    import peft
    import slimtune
    from slimtune.compile_blocks import compile_blocks, uncompile_blocks

    names = ("base", "peft", "slimtune", "slimtune_merged") + (("base_compile", "slimtune_compile") if compiled else ())
    acc: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in names}

    def timed(name, m):  # warm-up steps in the first round only: later rounds find the code paths warm
        ts, mem, out = _infer_times(m, x, p, p.infer_steps, (c := []), warmup=p.warmup if rnd == 0 else 0)
        acc[name][0].extend(ts)
        acc[name][1].extend(c)
        acc[name][2].append(mem)
        return out

    state = None
    for rnd in range(p.infer_rounds or p.rounds):
        plain = timed("base", model)
        pm = peft.get_peft_model(model, _peft_cfg(p, init_lora_weights=False))
        if state is None:  # PEFT's random adapter weights, reused for every round and for slimtune
            state = {k: v.detach().clone() for k, v in pm.named_parameters() if ".lora_" in k}
        else:
            _copy_lora(pm, state)
        ref = timed("peft", pm)
        pm.unload()
        sm = slimtune.get_peft_model(model, _slim_cfg(p))
        _copy_lora(sm, state)
        got = timed("slimtune", sm)
        if rnd == 0:
            checks["infer_max_abs_diff_vs_peft"] = (got - ref).abs().max().item()
            checks["infer_lora_effect_max_abs"] = (ref - plain).abs().max().item()  # nonzero: adapters do act
        sm.merge_adapter()
        timed("slimtune_merged", sm)
        sm.unmerge_adapter()
        if compiled:
            compile_blocks(sm)
            got_c = timed("slimtune_compile", sm)
            uncompile_blocks(sm)
            sm.unload()
            compile_blocks(model)
            timed("base_compile", model)
            uncompile_blocks(model)
            if rnd == 0:
                checks["infer_compile_max_abs_diff"] = (got_c - got).abs().max().item()
        else:
            sm.unload()
    rows = []
    for name, (ts, c, mems) in acc.items():
        mem = max(mems) if mems and mems[0] is not None else None
        rows.append(Row("infer", name, statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))
    return rows


def _copy_lora(sm, state: dict) -> None:
    """Copy adapter tensors by name (PEFT and slimtune share the key layout) into a live model."""
    live = dict(sm.named_parameters())
    missing = [k for k in state if k not in live]
    if missing:
        raise RuntimeError(f"slimtune has no parameter {missing[0]} that PEFT has; key layouts differ")
    with torch.no_grad():
        for k, v in state.items():
            live[k].copy_(v)


def _mixed(model, p: Preset, checks: dict) -> list[Row]:
    import peft
    import slimtune

    n = p.mixed_adapters
    names = [f"a{i}" for i in range(n)]
    g = torch.Generator().manual_seed(1)
    xm = torch.randint(0, p.model["vocab_size"], (n, p.seq), generator=g).to(p.device)
    rows = []
    ts, mem, _ = _infer_times(model, xm, p, p.infer_steps, (c := []))
    rows.append(Row("mixed", "base", statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))

    pm = peft.get_peft_model(model, _peft_cfg(p, init_lora_weights=False), adapter_name=names[0])
    for nm in names[1:]:
        pm.add_adapter(nm, _peft_cfg(p, init_lora_weights=False))
    ts, mem, ref = _infer_times(pm, xm, p, p.infer_steps, (c := []), adapter_names=names)
    state = {k: v.detach().clone() for k, v in pm.named_parameters() if ".lora_" in k}
    pm.unload()
    rows.append(Row("mixed", "peft", statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))

    sm = slimtune.get_peft_model(model, _slim_cfg(p), adapter_name=names[0])
    for nm in names[1:]:
        sm.add_adapter(nm, _slim_cfg(p))
    _copy_lora(sm, state)
    ts, mem, got = _infer_times(sm, xm, p, p.infer_steps, (c := []), adapter_names=names)
    checks["mixed_max_abs_diff_vs_peft"] = (got - ref).abs().max().item()
    checks["mixed_max_abs_logit"] = ref.abs().max().item()
    sm.unload()
    rows.append(Row("mixed", "slimtune", statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))
    return rows
