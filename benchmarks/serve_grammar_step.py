"""In-process profile of the serve engine's step with 16 JSON-schema rows (the serve bench's schema
and prompts, SmolLM2-135M fp32, 2 threads), against 16 plain rows of the same lengths: wall time,
and the time in the forward, the grammar (grammar.constrain: mask fill + apply), sampling, and the
matchers' consume_token (grammar.advance). Run: flock /tmp/slimtune-bench.lock python benchmarks/serve_grammar_step.py"""
import collections
import json
import time

import torch
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM, AutoTokenizer
from slimtune.train import models
from slimtune.serve import ServeConfig, make_server
from slimtune.serve.handles import GenRequest
from slimtune.serve import grammar, sampling
from slimtune.serve.forward import ModelCall
from slimtune.bench.serve import SCHEMA, QUESTION, PROMPTS

path = models.resolve("smollm2-135m")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
srv = make_server(model, tok, ServeConfig(max_batch=16))
E = srv.engine
T = collections.defaultdict(float); N = collections.Counter()
def wrap(mod, name, key):
    f = getattr(mod, name)
    def g(*a, **k):
        t0 = time.perf_counter(); r = f(*a, **k); T[key] += time.perf_counter() - t0; N[key] += 1; return r
    setattr(mod, name, g)
wrap(grammar, "constrain", "constrain")
wrap(grammar, "advance", "advance")
wrap(sampling, "next_tokens", "next_tokens")
orig_fwd = ModelCall.__call__  # a batch's forward (serve/forward.py)
def fwd(self, *a, **k):
    t0 = time.perf_counter(); r = orig_fwd(self, *a, **k); T["forward"] += time.perf_counter() - t0; N["forward"] += 1; return r
ModelCall.__call__ = fwd

gram = srv.grammars.schema_grammar(SCHEMA)
prompts = [tok(tok.apply_chat_template([{"role": "user", "content": QUESTION + p}], add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids for p in PROMPTS]

def run(constrained, max_tokens_list=None):
    T.clear(); N.clear()
    reqs = []
    for i, p in enumerate(prompts):
        mt = max_tokens_list[i] if max_tokens_list else 32
        reqs.append(GenRequest(prompt=list(p), max_tokens=mt, ignore_eos=True,
                               matcher=srv.grammars.matcher(gram) if constrained else None))
    t0 = time.perf_counter()
    hs = [E.submit(r) for r in reqs]
    outs = []
    for h in hs:
        toks = []
        while True:
            _, ev = h.queue.get(timeout=120)
            toks += ev.tokens
            if ev.finish: break
        outs.append(toks)
    wall = time.perf_counter() - t0
    return wall, outs, dict(T), dict(N)

E.start()
run(True); run(False)  # warm
for rep in range(2):
    wj, oj, tj, nj = run(True)
    lens = [len(o) for o in oj]
    wf, of, tf, nf = run(False, lens)
    ntok = sum(lens)
    ok = 0
    for o in oj:
        try: json.loads(tok.decode(o, skip_special_tokens=True)); ok += 1
        except ValueError: pass
    print('parsed', ok, 'of', len(oj))
    print(f"rep {rep}: json {ntok} tok {wj:.2f}s {ntok/wj:.1f} tok/s | free same lens {wf:.2f}s {ntok/wf:.1f} tok/s | ratio {wf/wj:.3f}")
    print("  json", {k: round(v, 3) for k, v in tj.items()}, nj)
    print("  free", {k: round(v, 3) for k, v in tf.items()}, nf)
    print("  lens", lens)
print(repr(tok.decode(oj[0])), [tok.decode([t]) for t in oj[0]])
E.stop()
