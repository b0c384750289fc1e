"""CPU cost per token of structured output (serve/grammar.py: llguidance masks) on SmolLM2-135M's
tokenizer (49,152 tokens): the mask of each constrained row per step, and unpacking it onto the
logits, for 1, 8 and 16 constrained rows; the JSON a row follows is fixed (31 tokens), so the work is
exactly what a decode step adds. Run: OMP_NUM_THREADS=1 python benchmarks/serve_grammar_cost.py"""
import json
import time

import llguidance
import llguidance.hf
import torch
from transformers import AutoTokenizer

from slimtune.serve.grammar import constrain
from slimtune.train.models import smollm2_folder

torch.set_num_threads(1)
V = 49152
tok = AutoTokenizer.from_pretrained(str(smollm2_folder()))
t = time.perf_counter()
lt = llguidance.hf.from_tokenizer(tok, n_vocab=V)
print(f"llguidance tokenizer build (once per server): {time.perf_counter() - t:.2f} s")
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
doc = {"name": "Ada Lovelace the first programmer", "age": 36, "tags": ["red", "blue", "green"], "ok": True}
ids = tok(json.dumps(doc, separators=(",", ":")), add_special_tokens=False)["input_ids"]
t = time.perf_counter()
g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
print(f"schema compile: {1e3 * (time.perf_counter() - t):.2f} ms")
for rep in range(2):  # the first pass warms the lexer's lazy state
    for rows in (1, 8, 16):
        ms = [llguidance.LLMatcher(lt, g) for _ in range(rows)]
        logits = torch.randn(rows, V)
        t = time.perf_counter()
        for tid in ids:
            out = constrain(logits, ms)
            assert out[:, tid].isfinite().all()
            for m in ms:
                assert m.consume_token(tid)
        dt = (time.perf_counter() - t) / len(ids)
        if rep:
            print(f"{rows} constrained row(s): {1e3 * dt:.3f} ms per decode step ({1e3 * dt / rows:.3f} ms per row-token)")

# what a decode step of the model itself costs here, for scale (fp32, KV cache, 64 tokens of context)
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch.float32).eval()
with torch.no_grad():
    for rows in (1, 8, 16):
        out = model(input_ids=torch.randint(0, V, (rows, 64)), use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(16):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        print(f"SmolLM2-135M decode step, {rows} row(s): {1e3 * (time.perf_counter() - t) / 16:.1f} ms")
