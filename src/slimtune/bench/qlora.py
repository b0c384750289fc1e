"""QLoRA benchmark: LoRA on the full-precision base vs slimtune QLoRA (NF4) vs the real PEFT's QLoRA,
side by side in one run, ratios printed.

    python -m slimtune.bench.qlora --part shape   # SmolLM2-135M shape, random init, 4×128, timed steps
    python -m slimtune.bench.qlora --part job     # the default job (slimtune train) three ways
    python -m slimtune.bench.qlora                # both; writes benchmarks/results/qlora-<preset>.{json,md}

shape  One random-init Llama of the preset's shape (bench/presets.py: `cpu` = SmolLM2-135M, 4×128,
       fp32, 2 threads; `gpu-0.85b`, `gpu-6.7b` bf16 on CUDA), saved once and loaded twice: as it is
       (LoRA rows) and through transformers' bitsandbytes integration in NF4 with double quant
       (QLoRA rows), exactly as a PEFT user loads it. Rows, round-robin so machine noise hits all alike:
         lora        slimtune LoRA r=16 α=32 on q,k,v,o,gate,up,down, full-precision base
         qlora       slimtune, same adapter config, on the NF4 base (compute dtype = the preset's dtype)
         peft_qlora  HF PEFT the same (its defaults: fp32 adapters), after peft.prepare_model_for_kbit_training
       Per row: median step (forward, backward, AdamW) wall and process-CPU time, the modelled peak of
       training memory (core.py's model: every weight as held, quantization state included, + the tensors
       autograd saves + gradients + AdamW state of the trained parameters; on GPU max_memory_allocated),
       the model's weight bytes and the adapted linears' bytes against their bf16 size.
job    `slimtune train` with the default config (LoRA on the packaged SmolLM2-135M-Instruct, plot vs
       review, held-out gen_accuracy) as `lora`, with model.quantize=nf4 as `qlora`, and `peft_qlora`: the
       same job's data, config, trainer and evaluation around peft.get_peft_model on the same NF4 base.
       Each in its own process (peak RSS per row); train.cpu_threads=2 for all three.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .core import _count_saved, build_model
from .presets import PRESETS, TARGETS, Preset

ROWS = ("lora", "qlora", "peft_qlora")


def _load_quantized(folder: str, p: Preset):
    from transformers import AutoModelForCausalLM

    from ..quant.config import load_kwargs

    return AutoModelForCausalLM.from_pretrained(folder, **load_kwargs("nf4", True, getattr(torch, p.dtype)))


def _weight_bytes(model) -> int:
    from ..quant import quantized_size

    size = quantized_size(model)
    if size is not None:
        return size.model_bytes
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _adapted_bytes(model) -> tuple[int, int]:
    """(bytes of the seven target linears as held, the same linears in bf16)."""
    from ..quant import backend as qb

    held = bf16 = 0
    for name, m in model.named_modules():
        if name.split(".")[-1] not in TARGETS or not isinstance(m, torch.nn.Linear):
            continue
        n = m.in_features * m.out_features
        bf16 += 2 * n
        held += qb.layer_bytes(m) if qb.kind(m) else m.weight.numel() * m.weight.element_size()
    return held, bf16


def _setup(row: str, models: dict, p: Preset):
    """(model to call, trained params, teardown) for one row."""
    import peft

    import slimtune

    if row == "peft_qlora":
        base = models["nf4"]  # prepared once for both QLoRA rows (run_shape), as PEFT's recipe does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = peft.get_peft_model(base, peft.LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=TARGETS))
    else:
        m = slimtune.get_peft_model(models["fp" if row == "lora" else "nf4"],
                                    slimtune.LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=TARGETS))
    params = [q for q in m.parameters() if q.requires_grad]
    return m, params, lambda: m.unload()


def _steps(model, params, x, p: Preset, first: bool) -> tuple[list[float], list[float], float | None, float]:
    """Timed training steps; on the first round the memory model and the first loss."""
    dev = p.device
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    held = {q.untyped_storage().data_ptr() for q in model.parameters()}
    wall, cpu, mem, loss0 = [], [], None, float("nan")
    model.train()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(p.warmup + p.steps):
        probe = first and i == 0 and dev != "cuda"
        sink: dict = {}
        t0, c0 = time.perf_counter(), time.process_time()
        if probe:
            with _count_saved(held, sink):
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            loss0 = float(loss.detach())
        if i >= p.warmup:
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
        if probe:
            n_train = sum(q.numel() * q.element_size() for q in params)
            mem = (_weight_bytes(model) + sink["saved_bytes"] + 3 * n_train) / 2**20
    if dev == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    return wall, cpu, mem, loss0


def run_shape(p: Preset, log=print) -> dict[str, Any]:
    if p.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"preset '{p.name}' needs a CUDA GPU")
    if p.threads:
        torch.set_num_threads(p.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    fp = build_model(p)
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        fp.to("cpu").save_pretrained(tmp)
        fp.to(p.device)
        nf4 = _load_quantized(tmp, p)
    nf4.config.use_cache = False
    import slimtune

    # PEFT's recipe, once, for both QLoRA rows: freeze, non-quantized fp16/bf16 weights to fp32 (a no-op in fp32)
    slimtune.prepare_model_for_kbit_training(nf4, use_gradient_checkpointing=False)
    models = {"fp": fp, "nf4": nf4}
    x = torch.randint(0, p.model["vocab_size"], (p.batch, p.seq), generator=torch.Generator().manual_seed(0)).to(p.device)
    times = {r: ([], []) for r in ROWS}
    mem, loss0, trainable = {}, {}, {}
    for rnd in range(p.rounds):
        for row in ROWS:
            m, params, teardown = _setup(row, models, p)
            try:
                w, c, mm, l0 = _steps(m, params, x, p, first=rnd == 0)
            finally:
                teardown()
            times[row][0].extend(w)
            times[row][1].extend(c)
            if rnd == 0:
                mem[row], loss0[row], trainable[row] = mm, l0, sum(q.numel() for q in params)
            log(f"{row} round {rnd}: {[round(t) for t in w]} ms")
    held_fp, bf16 = _adapted_bytes(fp)
    held_q, _ = _adapted_bytes(nf4)
    rows = []
    for row in ROWS:
        base = fp if row == "lora" else nf4
        rows.append({"row": row, "ms": statistics.median(times[row][0]), "cpu_ms": statistics.median(times[row][1]),
                     "times_ms": times[row][0], "mem_mib": mem[row], "first_loss": loss0[row],
                     "trainable": trainable[row], "weight_mib": _weight_bytes(base) / 2**20,
                     "adapted_mib": (held_fp if row == "lora" else held_q) / 2**20, "adapted_bf16_mib": bf16 / 2**20})
    by = {r["row"]: r for r in rows}
    ratios = {f"{k}_{a}_vs_{b}": round(by[a][k] / by[b][k], 3) for a, b in
              (("qlora", "lora"), ("peft_qlora", "lora"), ("qlora", "peft_qlora")) for k in ("ms", "cpu_ms", "mem_mib")}
    ratios["adapted_nf4_vs_bf16_bytes"] = round(held_q / bf16, 3)
    return {"preset": p.name, "shape": {k: p.model[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
            "batch": p.batch, "seq": p.seq, "dtype": p.dtype, "rounds": p.rounds, "steps": p.steps, "threads": p.threads,
            "rows": rows, "ratios": ratios, "wall_s": round(time.perf_counter() - t_start, 1)}


# ---- the default job, three ways, a process each ------------------------------------------------------------
def _rss_mib() -> dict[str, float]:
    """Current and peak resident memory (VmRSS, VmHWM) of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _reset_peak_rss() -> float:
    """Restart the peak-RSS counter (Linux: /proc/self/clear_refs 5) once set-up is done, so the peak
    is the training phase's (evaluations included), not the load's: loading touches the checkpoint's
    mmapped pages and, when quantizing, holds dense and quantized copies of a layer for a moment."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_mib()["VmRSS"]


def job_row(row: str, out_dir: str, threads: int = 2) -> dict[str, Any]:
    """One row of the job part, in this process (called by the child the parent starts)."""
    from ..train.config import load_config
    from ..train.run import run_train

    over = [f"output_dir={out_dir}", f"train.cpu_threads={threads}"] + (["model.quantize=nf4"] if row != "lora" else [])
    cfg = load_config(None, over)
    t0 = time.time()
    rss0: list[float] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        if msg.startswith("trainable params"):  # run_train's last line before the Trainer starts
            rss0.append(_reset_peak_rss())

    if row == "peft_qlora":
        res = _peft_job(cfg, rss0)
    else:
        res = run_train(cfg, log=log, progress=False)
    model = res.pop("peft_model")
    trainer = res.pop("trainer")
    base = model.get_base_model()
    m = res["metric"]
    return {"row": row, "metric": m, "before": (res["before"] or {}).get(m), "after": (res["after"] or {}).get(m),
            "best": res["best"], "steps": res["steps"], "step_s": res["train_time_s"] / max(res["steps"], 1),
            "train_time_s": res["train_time_s"], "wall_s": time.time() - t0, "trainable": sum(
                p.numel() for p in model.parameters() if p.requires_grad),
            "weight_mib": _weight_bytes(base) / 2**20, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "log_dir": str(trainer.out),
            "rss_after_setup_mib": rss0[0] if rss0 else None, "peak_train_rss_mib": _rss_mib()["VmHWM"]}


def _peft_job(cfg, rss0: list) -> dict[str, Any]:
    """The default job's set-up, trainer and evaluation around peft.get_peft_model on the same NF4 base."""
    import peft

    from ..train.job import setup, upcast_trainable
    from ..train.resources import set_cpu_threads
    from ..train.trainer import Trainer

    torch.manual_seed(cfg.train.seed)
    set_cpu_threads(cfg.train.cpu_threads)
    s = setup(cfg)
    ac = s["adapter_config"]
    base = peft.prepare_model_for_kbit_training(s["model"], use_gradient_checkpointing=False)
    torch.manual_seed(cfg.train.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=ac.r, lora_alpha=ac.lora_alpha, target_modules=ac.target_modules,
                                                       layers_to_transform=ac.layers_to_transform, task_type=ac.task_type,
                                                       lora_dropout=ac.lora_dropout))
    upcast_trainable(pm)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg, pm, s["tokenizer"], s["data"], s["task"], progress=False)
    print(f"trainable params: {sum(p.numel() for p in pm.parameters() if p.requires_grad):,d} (peft)", flush=True)
    rss0.append(_reset_peak_rss())
    res = tr.train()
    res.update(peft_model=pm, trainer=tr)
    return res


def run_job(out_root: str, rows=ROWS, threads: int = 2, log=print) -> list[dict[str, Any]]:
    """Each row in its own process; its summary JSON and log go to out_root, its run folder to a temp dir."""
    results = []
    Path(out_root).mkdir(parents=True, exist_ok=True)
    runs = tempfile.mkdtemp(prefix="qlora-bench-job-")
    for row in rows:
        out_json = Path(out_root) / f"{row}.json"
        cmd = [sys.executable, "-m", "slimtune.bench.qlora", "--job-row", row, "--job-out", str(out_json),
               "--job-dir", str(Path(runs) / row), "--threads", str(threads)]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        text = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "it/s]" not in line)  # no progress bars
        (Path(out_root) / f"{row}.log").write_text(text + "\n")
        if r.returncode != 0:
            raise RuntimeError(f"job row {row} failed (exit {r.returncode}); see {out_root}/{row}.log:\n{r.stderr[-2000:]}")
        res = json.loads(out_json.read_text())
        log(f"job {row}: {res['metric']} {res['before']} -> {res['after']}, {res['step_s']:.2f} s/step, "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB ({time.time() - t0:.0f} s)")
        results.append(res)
    return results


# ---- report ----------------------------------------------------------------------------------------------
def _meta() -> dict[str, Any]:
    import transformers

    vers = {"torch": torch.__version__, "transformers": transformers.__version__}
    for mod in ("peft", "bitsandbytes"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            vers[mod] = None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"versions": vers, "cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "load_avg": os.getloadavg(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def markdown(res: dict[str, Any], cmd: str) -> str:
    lines = [f"# QLoRA benchmark ({res['meta']['date']})", "", f"`{cmd}`", "",
             f"versions {res['meta']['versions']}; {res['meta']['cpu']}, {res['meta']['cores']} cores, "
             f"load average at the end {tuple(round(v, 2) for v in res['meta']['load_avg'])}", ""]
    sh = res.get("shape")
    if sh:
        lines += [f"## {sh['preset']}: {sh['shape']}, batch {sh['batch']}×{sh['seq']}, {sh['dtype']}, "
                  f"{sh['rounds']} rounds × {sh['steps']} steps, {sh.get('threads')} thread(s)", "",
                  "| row | step ms (median) | CPU ms/step | ÷ lora | training memory MiB (model) | model weights MiB | "
                  "adapted linears MiB (÷ bf16) | first loss |", "|---|---|---|---|---|---|---|---|"]
        lora = next(r for r in sh["rows"] if r["row"] == "lora")
        for r in sh["rows"]:
            lines.append(f"| {r['row']} | {r['ms']:.0f} | {r['cpu_ms']:.0f} | {r['ms'] / lora['ms']:.2f} (CPU "
                         f"{r['cpu_ms'] / lora['cpu_ms']:.2f}) | {r['mem_mib']:.0f} | {r['weight_mib']:.1f} | "
                         f"{r['adapted_mib']:.1f} ({r['adapted_mib'] / r['adapted_bf16_mib']:.3f}) | {r['first_loss']:.4f} |")
        lines += ["", f"ratios: {sh['ratios']}", ""]
    job = res.get("job")
    if job:
        lines += ["## default job (`slimtune train`, SmolLM2-135M-Instruct, plot vs review)", "",
                  "| row | held-out metric before → after (best) | s/step | ÷ lora | train s | peak RSS MiB, training "
                  "(after set-up) | peak RSS MiB, whole process | model weights MiB |", "|---|---|---|---|---|---|---|---|"]
        lora = next((r for r in job if r["row"] == "lora"), job[0])
        for r in job:
            lines.append(f"| {r['row']} | {r['metric']} {r['before']:.2f} → {r['after']:.2f} ({r['best']:.2f}) | "
                         f"{r['step_s']:.2f} | {r['step_s'] / lora['step_s']:.2f} | {r['train_time_s']:.0f} | "
                         f"{r['peak_train_rss_mib']:.0f} ({r['rss_after_setup_mib']:.0f}) | {r['peak_rss_mib']:.0f} | "
                         f"{r['weight_mib']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slimtune.bench.qlora", description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["shape", "job", "all"], default="all")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--dtype", help="override the preset's dtype (float32, bfloat16)")
    ap.add_argument("--threads", type=int, help="override the preset's CPU threads (1: no spin-waiting on a busy machine)")
    ap.add_argument("--out", help="path stem (default benchmarks/results/qlora-<preset>)")
    ap.add_argument("--job-row", help=argparse.SUPPRESS)
    ap.add_argument("--job-out", help=argparse.SUPPRESS)
    ap.add_argument("--job-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if a.job_row:  # a child of run_job
        res = job_row(a.job_row, a.job_dir, a.threads or 2)
        Path(a.job_out).write_text(json.dumps(res, indent=1))
        return 0
    from dataclasses import replace

    p = replace(PRESETS[a.preset], **{k: v for k, v in (("rounds", a.rounds), ("steps", a.steps), ("dtype", a.dtype),
                                                          ("threads", a.threads)) if v is not None})
    stem = a.out or os.path.join("benchmarks", "results", f"qlora-{a.preset}")
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    res: dict[str, Any] = {}
    if a.part in ("shape", "all"):
        res["shape"] = run_shape(p)
        print(json.dumps(res["shape"]["ratios"]))
    if a.part in ("job", "all"):
        if p.device == "cuda":
            print("the job part runs the CPU default job; skipped on a GPU preset")
        else:
            res["job"] = run_job(stem + "-rows", threads=p.threads or 2)  # per-row JSON and logs
    res["meta"] = _meta()
    cmd = "python -m slimtune.bench.qlora " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(stem + ".json").write_text(json.dumps(res, indent=1))
    md = markdown(res, cmd.strip())
    Path(stem + ".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
