"""The benchmark: one random-init Llama, one batch, one seed; slimtune and HF PEFT side by side.

Scenarios (rows of the table):

    train  frozen        every weight frozen, gradients to the activations only: the floor
           peft          HF PEFT LoRA r=16 α=32 on q,k,v,o,gate,up,down (its default: fp32 adapters)
           peft_bf16     the same with autocast_adapter_dtype=False (low-precision presets only)
           slimtune      slimtune LoRA, same config
           full          full fine-tuning (optional)
           frozen_chunked_ce, slimtune_chunked_ce   (CPU, torch >= 2.13) the loss through the chunked
                         linear cross-entropy (kernels/chunked_ce.py): no (tokens × vocab) logits kept
           slimtune_shared / slimtune_function / slimtune_perlayer   ablations (--scenarios only)
           frozen+liger, slimtune+liger   (GPU) the same after slimtune.kernels.fused_ops.apply_fused_ops:
                         liger-kernel RMSNorm/RoPE/SwiGLU/fused linear-cross-entropy; ratios still to
                         the stock frozen floor. Run last: the patching cannot be undone.
    infer  base / peft unmerged / slimtune unmerged / slimtune merged   (forward only, no grad)
    mixed  base / peft / slimtune: one batch of 8 rows, each row its own adapter (adapter_names=)
    paired frozen / slimtune (--scenarios paired; paired_peft: frozen_peft / peft): one model, steps
           alternating between the adapter disabled and LoRA training; the median pair ratio with a
           bootstrap 95% interval (paired.py). paired_infer / paired_infer_peft: the same for
           unmerged inference (rows base / slimtune, base_peft / peft in group paired_infer)

Timing: median over timed steps after warm-up; on GPU synchronize around each step. On CPU the
training scenarios run round-robin (frozen, peft, slimtune, frozen, ...) so that drift and other
load on the machine hit every scenario alike.

Memory: on GPU `torch.cuda.max_memory_allocated` over the scenario (weights included, as in
the anchors). On CPU there is no allocator peak counter, and peak RSS only grows and counts the
allocator's caches, so we report a model of the peak that LoRA changes: bytes of every parameter
+ bytes of the distinct tensors autograd saves for backward (counted with saved_tensors_hooks
during a warm-up step, parameters excluded) + gradients of trainable parameters + AdamW's two
state tensors per trainable parameter (+ the N×d input gradient the chunked loss holds outside
autograd's saved tensors). It counts exactly what a LoRA implementation controls.

Presets are in `presets.py`, the scenario set-ups in `scenarios.py`, the tables in `report.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .presets import PRESETS, TARGETS, Preset  # noqa: F401  (re-exported: slimtune.bench.core.PRESETS)
from .report import _markdown, _meta, _ratios, format_table
from .scenarios import TRAIN_SETUPS, _peft_cfg, _slim_cfg  # noqa: F401

log = logging.getLogger("slimtune.bench")

# ---- helpers ------------------------------------------------------------------------------------
def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def build_model(p: Preset):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**p.model)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    dtype = getattr(torch, p.dtype)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(p.device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dtype)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


def _param_bytes(params) -> int:
    return sum(t.numel() * t.element_size() for t in params)


@contextlib.contextmanager
def _count_saved(exclude_ptrs: set[int], sink: dict):
    """Count distinct storages autograd saves for backward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in exclude_ptrs and ptr not in seen:
                seen[ptr] = st.nbytes()
        except Exception:  # pragma: no cover - exotic tensor subclasses
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    sink["saved_bytes"] = sum(seen.values())


@dataclass
class Row:
    group: str  # train | infer | mixed
    scenario: str
    ms: float
    tokens_per_s: float
    mem_mib: float | None
    trainable: int = 0
    times_ms: list = field(default_factory=list)
    cpu_ms: float | None = None  # median process CPU time per step (all threads): robust on a shared CPU
    note: str = ""


def _train_steps(model, params, x, p: Preset, measure_mem: bool, cpu_sink: list | None = None
                 ) -> tuple[list[float], float | None]:
    dev = p.device
    # fused AdamW for every row (the trainer's optimizer): one kernel, not a per-tensor loop
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    all_params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    times: list[float] = []
    mem = None
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(p.warmup + p.steps):
        probe = measure_mem and dev != "cuda" and i == 0
        sink: dict = {}
        ctx = _count_saved(all_params, sink) if probe else contextlib.nullcontext()
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(dev)
        dt, dc = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
        if i >= p.warmup:
            times.append(dt)
            if cpu_sink is not None:
                cpu_sink.append(dc)
        if probe:
            n_train = sum(q.numel() * q.element_size() for q in params)
            weights = _param_bytes({q.untyped_storage().data_ptr(): q for q in model.parameters()}.values())
            held = getattr(model, "held_bytes", 0)
            mem = (weights + sink["saved_bytes"] + held + 3 * n_train) / 2**20  # + grads + AdamW m, v
        del loss
    if dev == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    return times, mem


# ---- the run --------------------------------------------------------------------------------------
def run_benchmark(preset: str | Preset = "cpu", scenarios: list[str] | None = None, **overrides) -> dict:
    """Run a preset; returns {"meta": ..., "rows": [...], "checks": ...}. `overrides` replace Preset
    fields (steps=, rounds=, batch=, ...)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = replace(p, **{k: v for k, v in overrides.items() if v is not None})
    if p.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"preset '{p.name}' needs a CUDA GPU and none is visible; use --preset cpu")
    if p.threads:
        torch.set_num_threads(p.threads)
    warnings.filterwarnings("ignore")
    for name in ("peft", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    low_precision = p.dtype != "float32"
    train = ["frozen", "peft"] + (["peft_bf16"] if low_precision else []) + ["slimtune"] + (["full"] if p.full else [])
    if p.device == "cpu" and hasattr(torch.nn, "LinearCrossEntropyOptions"):  # on GPU: the liger rows
        train += ["slimtune_chunked_ce"]  # frozen_chunked_ce on request (--scenarios)
    if p.device == "cuda":  # torch.compile per layer; on CPU on request (it compiles for minutes)
        train += ["frozen_compile", "peft_bf16_compile", "slimtune_compile", "frozen_compile_graphs", "slimtune_compile_graphs"]
    wanted = set(scenarios) if scenarios else None
    if wanted:
        extra = ["slimtune_shared", "slimtune_function", "slimtune_perlayer", "frozen_chunked_ce", "frozen_compile",
                 "slimtune_compile", "peft_bf16_compile", "slimtune_compile_graphs", "slimtune_compile_perlayer", "frozen_compile_graphs", "slimtune_offload"]
        train = [s for s in dict.fromkeys(train + extra + list(TRAIN_SETUPS)) if s in wanted]

    from torch._dynamo import config as dynamo_config

    # compiled rows add their graphs to the one model's layers (2 each: first layer, the rest)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
    t_start = time.perf_counter()
    model = build_model(p)
    g = torch.Generator().manual_seed(0)
    vocab = p.model["vocab_size"]
    x = torch.randint(0, vocab, (p.batch, p.seq), generator=g).to(p.device)
    tokens = p.batch * p.seq
    rows: list[Row] = []
    checks: dict[str, Any] = {}

    # -- training, round-robin ------------------------------------------------------------------------
    times = {s: [] for s in train}
    cpus: dict[str, list] = {s: [] for s in train}
    mems: dict[str, float | None] = {}
    trainable: dict[str, int] = {}
    order = [s for s in train if s != "full"]
    for rnd in range(p.rounds):
        for s in order + (["full"] if "full" in train and rnd == 0 else []):  # full changes the weights: once, last
            m, params, teardown = TRAIN_SETUPS[s](model, p)
            try:
                ts, mem = _train_steps(m, params, x, p, measure_mem=(rnd == 0), cpu_sink=cpus[s])
            finally:
                teardown()
            times[s] += ts
            if rnd == 0:
                mems[s], trainable[s] = mem, sum(q.numel() for q in params)
            log.info("train %s round %d: %s ms", s, rnd, [round(t) for t in ts])
    for s in train:
        ms = statistics.median(times[s])
        rows.append(Row("train", s, ms, tokens / ms * 1000, mems.get(s), trainable.get(s, 0), times[s],
                        cpu_ms=statistics.median(cpus[s])))

    # -- the paired estimate of the LoRA overhead (on request: it takes pairs × 2 steps) -------------------
    paired = {"paired": ("slimtune", True), "paired_peft": ("peft", True), "paired_infer": ("slimtune", False),
              "paired_infer_peft": ("peft", False)}
    if wanted and wanted & set(paired):
        from .paired import paired_rows

        for lib, is_train in [v for s, v in paired.items() if s in wanted]:
            rows += paired_rows(model, x, p, checks, p.pairs, lib, train=is_train)

    # -- inference, single adapter, round-robin like training (base, peft, slimtune, merged, base, ...) -----
    from .infer import _infer_rows, _mixed

    if not wanted or wanted & {"infer", "infer_base", "infer_peft", "infer_slimtune", "infer_merged", "infer_compile"}:
        rows += _infer_rows(model, x, p, checks, compiled=(p.device == "cuda" and not wanted) or bool(
            wanted and "infer_compile" in wanted))

    # -- mixed batch of adapters ---------------------------------------------------------------------------
    if (not wanted or "mixed" in wanted) and p.mixed_adapters > 1:
        rows += _mixed(model, p, checks)

    # -- beat the floor: liger-kernel's fused ops (GPU), last because patching cannot be undone ---------
    if p.device == "cuda" and (not wanted or "liger" in wanted):
        try:
            rows += _liger_rows(model, x, p, checks, tokens)
        except Exception as e:  # recorded and printed, never silent: the stock rows above still stand
            log.exception("liger scenarios failed")
            checks["fused_ops_error"] = f"{type(e).__name__}: {e}"[:300]

    for r in rows:
        r.tokens_per_s = (p.mixed_adapters * p.seq if r.group == "mixed" else tokens) / r.ms * 1000
    return {"meta": _meta(p, time.perf_counter() - t_start), "rows": [asdict(r) for r in rows],
            "ratios": _ratios(rows), "checks": checks}


def _liger_rows(model, x, p: Preset, checks: dict, tokens: int) -> list[Row]:
    from slimtune.kernels.fused_ops import apply_fused_ops

    rows: list[Row] = []
    checks["fused_ops_path"] = apply_fused_ops(model)
    if checks["fused_ops_path"] != "liger":
        return rows
    lt: dict[str, list] = {"frozen": [], "slimtune": []}
    lm: dict[str, Any] = {}
    for rnd in range(p.rounds):
        for s in lt:
            m, params, teardown = TRAIN_SETUPS[s](model, p)
            try:
                ts, mem = _train_steps(m, params, x, p, measure_mem=(rnd == 0))
            finally:
                teardown()
            lt[s] += ts
            if rnd == 0:
                lm[s] = (mem, sum(q.numel() for q in params))
            log.info("train %s+liger round %d: %s ms", s, rnd, [round(t) for t in ts])
    for s, ts in lt.items():
        ms = statistics.median(ts)
        rows.append(Row("train", f"{s}+liger", ms, tokens / ms * 1000, lm[s][0], lm[s][1], ts))
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m slimtune.bench` / `slimtune bench`: run a preset, print the table, write JSON + md."""
    args = list(__import__("sys").argv[1:] if argv is None else argv)
    if "serve" in args and ("--preset" in args[: args.index("serve")] or "--preset=serve" in args):
        from .serve import main as serve_main  # the serving benchmark has its own options (bench/serve.py)

        return serve_main([x for x in args if x != "--preset=serve"])
    if "job" in args and ("--preset" in args[: args.index("job")] or "--preset=job" in args):
        from .job import main as job_main  # the job vs HF Trainer + peft benchmark (bench/job.py)

        return job_main([x for x in args if x != "--preset=job"])
    ap = argparse.ArgumentParser(prog="slimtune bench", description="slimtune vs HF PEFT, side by side")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, help="timed steps per round (default: the preset's)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int, help="round-robin repeats of the training and inference scenarios")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--pairs", type=int, help="step pairs of the paired estimate (--scenarios paired)")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=None, help="include full fine-tuning")
    ap.add_argument("--scenarios", help="comma list to run a subset: frozen,peft,peft_bf16,slimtune,full,infer,mixed,"
                    "paired,paired_peft,paired_infer,paired_infer_peft (paired estimates, bench/paired.py), "
                    "peft_loha,slimtune_loha (and lokr, vera, oft: bench/methods.py)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<preset>.json; '-' for none)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run_benchmark(a.preset, scenarios=a.scenarios.split(",") if a.scenarios else None, steps=a.steps,
                        warmup=a.warmup, rounds=a.rounds, infer_rounds=a.rounds, batch=a.batch, seq=a.seq, full=a.full,
                        pairs=a.pairs)
    print(format_table(res))
    out = a.out if a.out is not None else os.path.join("benchmarks", "results", f"{a.preset}.json")
    if out != "-":
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        cmd = "python -m slimtune.bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(_markdown(res, cmd.strip()))
        print(f"wrote {out}")
    return 0
