"""Where a 16-row prefill of base rows spends its time, under torch's profiler: on a server with the
bench's 16 adapters loaded (the rows run in the adapters' lane) and on one with none (the plain
base). SmolLM2-135M fp32, 2 threads, the serve bench's chat prompts; the third wave's prefill (the
prefix cache warm) is profiled. Wave 3i found the LM head there running as one `aten::bmm` over its
weight expanded to every row (transformers' int `logits_to_keep` slice is a strided view, and with
the weights frozen torch's matmul does not fold it into one mm).

Run: flock /tmp/slimtune-bench.lock python benchmarks/serve_prefill_profile.py
(before/after: the same command with PYTHONPATH=<other checkout>/src)
"""
import slimtune
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune import BASE_ADAPTER
from slimtune.bench import serve as B
from slimtune.serve import ServeConfig, make_server
from slimtune.serve.engine import GenRequest
from slimtune.serve.text import chat_prompt

torch.set_num_threads(2)
print("slimtune from", slimtune.__file__)


def profile_third_prefill(eng, prompts):
    """Three waves of 16 base rows (2 tokens each); the profile of the third wave's prefill."""
    prefill, state = eng._prefill, {}

    def spy(*args):
        if state.get("on"):
            with torch.profiler.profile() as prof:
                prefill(*args)
            state["prof"], state["on"] = prof, False
        else:
            prefill(*args)
    eng._prefill = spy
    eng.start()
    try:
        for wave in range(3):
            state["on"] = wave == 2
            handles = [eng.submit(GenRequest(p, BASE_ADAPTER, max_tokens=2, ignore_eos=True)) for p in prompts]
            for h in handles:
                h.result(600)
    finally:
        eng.stop()
    return state["prof"]


with tempfile.TemporaryDirectory() as tmp:
    base = B._model_folder("smollm2-135m", Path(tmp))
    ads = B._adapters(base, 16, 16, Path(tmp))
    tok = AutoTokenizer.from_pretrained(base)
    cfg = ServeConfig(max_batch=16, max_loaded=16, mixed_adapter_dtype="bfloat16")
    prompts = [chat_prompt(tok, [{"role": "user", "content": B.QUESTION + p}]) for p in B.PROMPTS[:16]]
    for side, adapters in (("lane", ads), ("plain", {})):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        eng = make_server(model, tok, cfg, adapters).engine
        prof = profile_third_prefill(eng, prompts)
        print("=====", side, "prefix hit", eng.prefix.hit_tokens, "computed", eng.prefix.computed_tokens)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=40))
