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
with tempfile.TemporaryDirectory() as tmp:
    base = B._model_folder("smollm2-135m", Path(tmp)); ads = B._adapters(base, 16, 16, Path(tmp))
    tok = AutoTokenizer.from_pretrained(base)
    cfg = ServeConfig(max_batch=16, max_loaded=16, mixed_adapter_dtype="bfloat16")
    P = lambda i: chat_prompt(tok, [{"role": "user", "content": B.QUESTION + B.PROMPTS[i % 16]}])
    for k, a in (("lane", ads), ("plain", {})):
        m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        eng = make_server(m, tok, cfg, a).engine
        f = eng._prefill; st = {}
        def spy(*args, f=f):
            if st.get("on"):
                with torch.profiler.profile() as prof:
                    f(*args)
                st["prof"] = prof
                st["on"] = False
            else:
                f(*args)
        eng._prefill = spy
        eng.start()
        for rnd in range(3):
            st["on"] = rnd == 2
            hs = [eng.submit(GenRequest(P(i), BASE_ADAPTER, max_tokens=2, ignore_eos=True)) for i in range(16)]
            for h in hs: h.result(600)
        eng.stop()
        print("=====", k, "prefix hit", eng.prefix.hit_tokens, "computed", eng.prefix.computed_tokens)
        print(st["prof"].key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=40))
