"""The server's engine in process, no HTTP: one wave of 16 chat requests (the serve bench's prompts,
32 tokens each, greedy) on 16 mixed LoRA adapters, then the same wave on the base model alone; the
time of each prefill and the median decode step, per round. Used in docs/serving.md ("One OpenMP
pool") to compare `--dedicated-cpus` and `--mixed-adapter-dtype` settings without the HTTP side.
(`serve_waves.py` gives the same waves' tokens/s and ratio, with the first request admitted early.)
With --plain-base, each round also runs the base rows on a second server with no adapters, where they
run on the plain base model instead of as "__base__" rows of the adapters' lane (LoRA wrappers on every
linear): what the "base alone" row pays for sharing a server with adapters.

Run: flock /tmp/slimtune-bench.lock python benchmarks/serve_engine_steps.py [--dedicated-cpus]
         [--mixed-adapter-dtype bfloat16] [--lora-kernel auto|on|off] [--rounds 3] [--threads 2] [--plain-base]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune import BASE_ADAPTER
from slimtune.bench import serve as B
from slimtune.serve import ServeConfig, make_server
from slimtune.serve.engine import GenRequest
from slimtune.serve.text import chat_prompt

ap = argparse.ArgumentParser()
ap.add_argument("--dedicated-cpus", action="store_true")
ap.add_argument("--mixed-adapter-dtype", default="model", choices=["model", "bfloat16"])
ap.add_argument("--lora-kernel", default="auto", choices=["auto", "on", "off"])
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--plain-base", action="store_true", help="also base rows on a server without adapters")
a = ap.parse_args()
torch.set_num_threads(a.threads)
with tempfile.TemporaryDirectory(prefix="slimtune-engine-steps-") as tmp:
    base = B._model_folder("smollm2-135m", Path(tmp))
    ads = B._adapters(base, 16, 16, Path(tmp))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    cfg = ServeConfig(max_batch=16, max_loaded=16, lora_kernel=a.lora_kernel, mixed_adapter_dtype=a.mixed_adapter_dtype,
                      dedicated_cpus=a.dedicated_cpus)
    srv = make_server(model, tok, cfg, ads)
    print(srv.kernel_line, "| dedicated_cpus", a.dedicated_cpus, "| mixed_adapter_dtype", a.mixed_adapter_dtype)
    engines = {"mixed": srv.engine, "base": srv.engine}
    if a.plain_base:  # its own copy of the model: the first server's lane shares the weights, not the modules
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        engines["plain"] = make_server(plain, tok, cfg, {}).engine
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    for eng in {id(e): e for e in engines.values()}.values():
        for kind in times:
            f = getattr(eng, "_" + kind)

            def spy(*args, f=f, kind=kind):
                t0 = time.perf_counter()
                f(*args)
                times[kind].append(time.perf_counter() - t0)
            setattr(eng, "_" + kind, spy)
    names = list(ads)

    def prompt(i):  # the server's own chat encoding
        return chat_prompt(tok, [{"role": "user", "content": B.QUESTION + B.PROMPTS[i % len(B.PROMPTS)]}])
    # with --plain-base one engine runs at a time (each spins its own OpenMP workers): each wave starts
    # and stops its engine, so a wave's first step also makes the engine thread's pool; without it the
    # one engine runs throughout, as in the wave 3g / 3h figures
    per_wave = a.plain_base
    if not per_wave:
        srv.engine.start()
    try:
        for rnd in range(a.rounds):  # the first round pays the plans' and caches' first use
            for side, eng in engines.items():
                for v in times.values():
                    v.clear()
                if per_wave:
                    eng.start()
                try:
                    hs = [eng.submit(GenRequest(prompt(i), names[i] if side == "mixed" else BASE_ADAPTER, max_tokens=32,
                                                ignore_eos=True)) for i in range(16)]
                    t0 = time.perf_counter()
                    for h in hs:
                        h.result(600)
                    wave = time.perf_counter() - t0
                finally:
                    if per_wave:
                        eng.stop()
                print(f"round {rnd} {side:5s} wave {wave:.2f} s, prefill "
                      f"{' + '.join(f'{x * 1e3:.0f}' for x in times['prefill'])} ms, decode step median "
                      f"{statistics.median(times['decode']) * 1e3:.1f} ms over {len(times['decode'])}", flush=True)
    finally:
        if not per_wave:
            srv.engine.stop()
