"""The benchmark: one random-init Llama, one batch, one seed; slimtune and HF PEFT side by side.

Scenarios (rows of the table):

    train  frozen        every weight frozen, gradients to the activations only: the floor
           peft          HF PEFT LoRA r=16 α=32 on q,k,v,o,gate,up,down (its default: fp32 adapters)
           peft_bf16     the same with autocast_adapter_dtype=False (low-precision presets only)
           slimtune      slimtune LoRA, same config
           full          full fine-tuning (optional)
           frozen+liger, slimtune+liger   (GPU) the same after slimtune.kernels.fused_ops.apply_fused_ops:
                         liger-kernel RMSNorm/RoPE/SwiGLU/fused linear-cross-entropy; ratios still to
                         the stock frozen floor. Run last: the patching cannot be undone.
    infer  base / peft unmerged / slimtune unmerged / slimtune merged   (forward only, no grad)
    mixed  base / peft / slimtune: one batch of 8 rows, each row its own adapter (adapter_names=)

Timing: median over timed steps after warm-up; on GPU synchronize around each step. On CPU the
training scenarios run round-robin (frozen, peft, slimtune, frozen, ...) so that drift and other
load on the machine hit every scenario alike.

Memory: on GPU `torch.cuda.max_memory_allocated` over the scenario (weights included, as in
the anchors). On CPU there is no allocator peak counter, and peak RSS only grows and counts the
allocator's caches, so we report a model of the peak that LoRA changes: bytes of every parameter
+ bytes of the distinct tensors autograd saves for backward (counted with saved_tensors_hooks
during a warm-up step, parameters excluded) + gradients of trainable parameters + AdamW's two
state tensors per trainable parameter. It counts exactly what a LoRA implementation controls.
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
from typing import Any, Callable

import torch

from .report import _markdown, _meta, _ratios, format_table

log = logging.getLogger("slimtune.bench")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
LLAMA_085B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
LLAMA_67B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


@dataclass
class Preset:
    name: str
    model: dict
    batch: int
    seq: int
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 1  # untimed steps after each scenario's set-up
    steps: int = 3  # timed steps per round
    rounds: int = 1  # round-robin repeats of the training scenarios
    infer_steps: int = 3
    full: bool = True  # include full fine-tuning
    mixed_adapters: int = 8
    r: int = 16
    alpha: int = 32
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # SmolLM2-135M shape, all 30 layers (fewer would flatter the floor ratio), 4×128, fp32, 2 threads.
    "cpu": Preset("cpu", SMOLLM2_135M, batch=4, seq=128, threads=2, warmup=1, steps=2, rounds=2,
                  infer_steps=3, full=False),
    "gpu-0.85b": Preset("gpu-0.85b", LLAMA_085B, batch=4, seq=1024, dtype="bfloat16", device="cuda",
                        warmup=3, steps=10, infer_steps=10),
    "gpu-6.7b": Preset("gpu-6.7b", LLAMA_67B, batch=1, seq=2048, dtype="bfloat16", device="cuda",
                       warmup=3, steps=10, infer_steps=10, full=False),
    # A seconds-long smoke run of the whole pipeline (tests use it; not a measurement).
    "tiny": Preset("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128),
                   batch=2, seq=16, warmup=1, steps=1, rounds=1, infer_steps=1, full=True, mixed_adapters=3),
}


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


# ---- scenarios: each returns (model to call, trainable params, teardown) ----------------------------
def _peft_cfg(p: Preset, **kw):
    from peft import LoraConfig

    return LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=TARGETS, **kw)


def _slim_cfg(p: Preset, **kw):
    from slimtune import LoraConfig

    return LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=TARGETS, **kw)


def setup_frozen(model, p):
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model, [], lambda: model.disable_input_require_grads()


def setup_full(model, p):
    model.requires_grad_(True)
    return model, list(model.parameters()), lambda: model.requires_grad_(False)


def _setup_peft(model, p, autocast: bool):
    import peft

    pm = peft.get_peft_model(model, _peft_cfg(p), autocast_adapter_dtype=autocast)
    params = [q for q in pm.parameters() if q.requires_grad]
    return pm, params, lambda: pm.unload()


def setup_peft(model, p):
    return _setup_peft(model, p, True)


def setup_peft_bf16(model, p):
    return _setup_peft(model, p, False)


def setup_slimtune(model, p):
    import slimtune

    sm = slimtune.get_peft_model(model, _slim_cfg(p))
    params = [q for q in sm.parameters() if q.requires_grad]
    return sm, params, lambda: sm.unload()


def _slimtune_with(module, flag: str, value: bool):
    """An ablation: slimtune with one module-level switch flipped for the scenario's lifetime."""
    def setup(model, p):
        default = getattr(module, flag)
        setattr(module, flag, value)
        sm, params, teardown = setup_slimtune(model, p)

        def undo():
            setattr(module, flag, default)
            teardown()
        return sm, params, undo
    return setup


def setup_slimtune_shared(model, p):
    """Ablation: slimtune with q/k/v and gate/up run as one node each (lora_layers.SHARE_INPUTS)."""
    from slimtune.methods import lora_layers

    return _slimtune_with(lora_layers, "SHARE_INPUTS", True)(model, p)


def setup_slimtune_function(model, p):
    """Ablation: every layer through the Python-backward autograd function (_LoraLinearFn)."""
    from slimtune.kernels import lora as kl

    return _slimtune_with(kl, "NATIVE_AUTOGRAD", False)(model, p)


class _ChunkedLoss:
    """Called like the model, but the loss runs through the chunked linear cross-entropy
    (kernels/chunked_ce.py). `held_bytes`: the N×d input gradient that loss computes in forward
    and keeps as a ctx attribute, which saved-tensor hooks do not see; the memory model adds it."""

    def __init__(self, model, p: Preset) -> None:
        from slimtune.kernels.chunked_ce import chunked_causal_lm_loss

        self.model, self.fn = model, chunked_causal_lm_loss(model)
        if self.fn is None:
            raise RuntimeError("chunked cross-entropy does not apply here (needs torch >= 2.13)")
        self.held_bytes = p.batch * p.seq * p.model["hidden_size"] * torch.tensor([], dtype=getattr(torch, p.dtype)).element_size()

    def __call__(self, input_ids, labels):
        return argparse.Namespace(loss=self.fn({"input_ids": input_ids, "labels": labels}))

    def parameters(self):
        return self.model.parameters()


def _chunked(setup: Callable) -> Callable:
    def chunked_setup(model, p):
        m, params, teardown = setup(model, p)
        return _ChunkedLoss(m, p), params, teardown
    return chunked_setup


def setup_slimtune_perlayer(model, p):
    """Ablation: gate/up/down through their own LoRA layers, no fused SwiGLU block (lora_blocks)."""
    from slimtune.methods import lora_blocks

    return _slimtune_with(lora_blocks, "FUSE_SWIGLU", False)(model, p)


TRAIN_SETUPS: dict[str, Callable] = {
    "frozen": setup_frozen, "peft": setup_peft, "peft_bf16": setup_peft_bf16,
    "slimtune": setup_slimtune, "slimtune_shared": setup_slimtune_shared,
    "slimtune_function": setup_slimtune_function, "slimtune_perlayer": setup_slimtune_perlayer, "full": setup_full,
    "frozen_chunked_ce": _chunked(setup_frozen), "slimtune_chunked_ce": _chunked(setup_slimtune),
}


def _train_steps(model, params, x, p: Preset, measure_mem: bool, cpu_sink: list | None = None
                 ) -> tuple[list[float], float | None]:
    dev = p.device
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
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


def _infer_times(model, x, p: Preset, n: int, cpu_sink: list | None = None, **kw
                 ) -> tuple[list[float], float | None, Any]:
    dev = p.device
    model.eval()
    times = []
    cpu_sink = [] if cpu_sink is None else cpu_sink
    out = None
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(p.warmup + n):
            out = None
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(input_ids=x, **kw).logits
            _sync(dev)
            if i >= p.warmup:
                times.append((time.perf_counter() - t0) * 1000)
                cpu_sink.append((time.process_time() - c0) * 1000)
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    model.train()
    return times, mem, out[:, -8:].float().clone()


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
        train += ["frozen_chunked_ce", "slimtune_chunked_ce"]
    wanted = set(scenarios) if scenarios else None
    if wanted:
        train = [s for s in train + ["slimtune_shared", "slimtune_function", "slimtune_perlayer"] if s in wanted]

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

    # -- inference, single adapter -----------------------------------------------------------------------
    if not wanted or wanted & {"infer", "infer_base", "infer_peft", "infer_slimtune", "infer_merged"}:
        import peft
        import slimtune

        ts, mem, plain = _infer_times(model, x, p, p.infer_steps, (c := []))
        rows.append(Row("infer", "base", statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))
        pm = peft.get_peft_model(model, _peft_cfg(p, init_lora_weights=False))
        ts, mem, ref = _infer_times(pm, x, p, p.infer_steps, (c := []))
        state = {k: v.detach().clone() for k, v in pm.named_parameters() if ".lora_" in k}
        pm.unload()
        rows.append(Row("infer", "peft", statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))
        sm = slimtune.get_peft_model(model, _slim_cfg(p))
        _copy_lora(sm, state)
        ts, mem, got = _infer_times(sm, x, p, p.infer_steps, (c := []))
        checks["infer_max_abs_diff_vs_peft"] = (got - ref).abs().max().item()
        checks["infer_lora_effect_max_abs"] = (ref - plain).abs().max().item()  # nonzero: adapters do act
        rows.append(Row("infer", "slimtune", statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))
        sm.merge_adapter()
        ts, mem, _ = _infer_times(sm, x, p, p.infer_steps, (c := []))
        rows.append(Row("infer", "slimtune_merged", statistics.median(ts), 0, mem, times_ms=ts, cpu_ms=statistics.median(c)))
        sm.unmerge_adapter()
        sm.unload()
        del state, ref, got, plain

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


def _copy_lora(sm, state: dict) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """`python -m slimtune.bench` / `slimtune bench`: run a preset, print the table, write JSON + md."""
    ap = argparse.ArgumentParser(prog="slimtune bench", description="slimtune vs HF PEFT, side by side")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, help="timed steps per round (default: the preset's)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int, help="round-robin repeats of the training scenarios")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=None, help="include full fine-tuning")
    ap.add_argument("--scenarios", help="comma list to run a subset: frozen,peft,peft_bf16,slimtune,full,infer,mixed")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<preset>.json; '-' for none)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run_benchmark(a.preset, scenarios=a.scenarios.split(",") if a.scenarios else None, steps=a.steps,
                        warmup=a.warmup, rounds=a.rounds, batch=a.batch, seq=a.seq, full=a.full)
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
