"""Per-rank memory and step time of the job on CPU: 1 process vs 2 processes, DDP vs FSDP2, on the
SmolLM2-135M shape (the packaged SmolLM2-135M-Instruct, fp32), LoRA r=16 on q/k/v/o (on CPU the job
adapts the top third of the blocks), global batch 4 x up to 128 tokens, the same steps and seed in
every row. Each row is its own launch (torchrun for 2 processes); every rank writes what it held
and used:

    params held   MiB of parameters in this rank's memory (FSDP: its shards)
    RSS end       resident memory after training (the job's own tensors, Python, torch, the data)
    RSS peak      peak resident memory (includes loading the whole checkpoint before sharding)
    step          mean seconds per optimizer step of the session (the first step included)

    nice -n 5 python benchmarks/distributed_cpu.py --steps 6 --out benchmarks/results/distributed-cpu

Ratios to the 1-process row are printed; absolute times on 2 shared cores drift between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(out_json: str, steps: int, mode: str, run_dir: str) -> None:
    """Run by each rank: the job, then this rank's figures."""
    import psutil

    from slimtune.train.config import JobConfig
    from slimtune.train.run import run_train

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = JobConfig.model_validate({
        "model": "smollm2-135m", "method": {"name": "lora", "r": 16, "lora_alpha": 32,
                                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                            "lora_dropout": 0.0},
        "data": {"builtin": "rotten_tomatoes_lm", "max_length": 128, "max_train": 64, "max_eval": 8},
        "train": {"max_steps": steps, "batch_size": 4 // world, "eval_before": False, "eval_every": 10_000,
                  "log_every": 1, "cpu_threads": max(1, 2 // world), "distributed": mode, "chunked_ce": "off"},
        "eval": {"generate": False, "samples": 0, "batch_size": 4},
        "output_dir": run_dir, "overwrite": True})
    res = run_train(cfg, log=lambda m: None, progress=False)
    rank = int(os.environ.get("RANK", 0))
    rec = {"rank": rank, "world": world, "mode": res["distributed"], "steps": res["steps"],
           "params_held_mb": res["params_mb_per_process"], "rss_end_mb": psutil.Process().memory_info().rss / 2**20,
           "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_s": res["step_time_s"], "eval_loss": (res["after"] or {}).get("eval_loss")}
    Path(f"{out_json}.rank{rank}").write_text(json.dumps(rec))


def run_row(name: str, nproc: int, mode: str, steps: int, tmp: Path) -> list[dict]:
    from slimtune.train.launch import free_port

    out = tmp / name
    args = [str(Path(__file__).resolve()), "worker", str(out), str(steps), mode, str(tmp / f"run-{name}")]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if nproc > 1 else [sys.executable]) + args
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(max(1, 2 // nproc)))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="bench")
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed-cpu"))
    a = ap.parse_args()
    if a.what == "worker":
        worker(a.rest[0], int(a.rest[1]), a.rest[2], a.rest[3])
        return
    import tempfile

    load = [os.getloadavg()]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, mode in (("1 process", 1, "auto"), ("2 x DDP", 2, "ddp"), ("2 x FSDP", 2, "fsdp")):
            t0 = time.time()
            rows[name] = run_row(name.replace(" ", "_"), n, mode, a.steps, Path(tmp))
            print(f"{name}: {time.time() - t0:.0f} s wall", flush=True)
    load.append(os.getloadavg())
    one = rows["1 process"][0]
    lines = ["| run | rank | params held (MiB) | vs 1 process | RSS end (MiB) | RSS peak (MiB) | step (s) | eval loss |",
             "|---|---|---|---|---|---|---|---|"]
    for name, recs in rows.items():
        for r in recs:
            lines.append(f"| {name} | {r['rank']} | {r['params_held_mb']:.1f} | "
                         f"{r['params_held_mb'] / one['params_held_mb']:.2f}x | {r['rss_end_mb']:.0f} | "
                         f"{r['rss_peak_mb']:.0f} | {r['step_s']:.2f} | {r['eval_loss']:.4f} |")
    meta = {"steps": a.steps, "loadavg_before": load[0], "loadavg_after": load[1], "rows": rows,
            "torch_threads": "2 (1 process) / 1 per rank (2 processes)", "cmd": " ".join(sys.argv)}
    Path(a.out + ".json").write_text(json.dumps(meta, indent=1))
    text = "\n".join(lines) + f"\n\nload average before {load[0]}, after {load[1]}; {a.steps} steps per row\n"
    Path(a.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
