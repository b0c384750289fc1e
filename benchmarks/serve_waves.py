"""The serve bench's request waves on the engine in process (no HTTP, no server process): 16
requests of 32 tokens (ignore_eos), the first admitted a step before the other 15 as the bench's
closed-loop clients come back; 16 LoRA adapters (r=16, all linear, one per row) against the same
rows on the base model, alternating (A B B A), 2 waves each; tokens/s and the ratio. Tells the
engine's and the mixed batch's costs (joins, prefills, plans) from the HTTP side's.

Run: flock /tmp/slimtune-bench.lock python benchmarks/serve_waves.py [rounds, default 2]
(before/after: the same command with PYTHONPATH=<other checkout>/src)
"""
import sys
import tempfile
import time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import slimtune
from slimtune.bench import serve as bench
from slimtune.serve import Engine, GenRequest, Registry, ServeConfig
from slimtune.serve.text import chat_prompt
from slimtune.train import models

torch.set_num_threads(2)
print("slimtune from", slimtune.__file__, flush=True)
base = models.resolve("smollm2-135m")
work = Path(tempfile.mkdtemp(prefix="serve-waves-"))
bench._adapters(base, 16, 16, work)
names = [f"a{i}" for i in range(16)]
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
reg = Registry(model, "base", max_loaded=16)
for n in names:
    reg.add(n, str(work / n), "cli")
eng = Engine(reg, ServeConfig(max_batch=16), [tok.eos_token_id], tok.pad_token_id).start()
prompts = [chat_prompt(tok, [{"role": "user", "content": bench.QUESTION + p}]) for p in bench.PROMPTS]

def wave(w, base_rows):
    reqs = [(("__base__" if base_rows else names[(c + w) % 16]), prompts[(c * 2 + w) % 16]) for c in range(16)]
    hs = [eng.submit(GenRequest(reqs[0][1], reqs[0][0], max_tokens=32, ignore_eos=True))]
    first = hs[0].queue.get(timeout=600)
    hs += [eng.submit(GenRequest(p, a, max_tokens=32, ignore_eos=True)) for a, p in reqs[1:]]
    n = len(first[1].tokens) + sum(len(h.result(600)[0]) for h in hs)
    return n

wave(0, False); wave(0, True)  # warm-up
res = {"mixed": [0.0, 0], "base": [0.0, 0]}
for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for k in (["mixed", "base"] if rnd % 2 == 0 else ["base", "mixed"]):
        t0 = time.perf_counter()
        n = sum(wave(w, k == "base") for w in range(2))
        res[k][0] += time.perf_counter() - t0; res[k][1] += n
eng.stop()
tps = {k: v[1] / v[0] for k, v in res.items()}
print({k: round(v, 2) for k, v in tps.items()}, "mixed/base", round(tps["mixed"] / tps["base"], 3), flush=True)
