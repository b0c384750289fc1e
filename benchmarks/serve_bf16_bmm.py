"""The LoRA part of a mixed decode step, fp32 against bf16 weights (serve --mixed-adapter-dtype
bfloat16): 16 rows, per row one (576x16) A and one (16x1536) B, 60 layers' worth so the weights come
from memory, one thread; fp32 and bf16 alternate three times.
Run: flock /tmp/slimtune-bench.lock python benchmarks/serve_bf16_bmm.py"""
import torch, time
torch.set_num_threads(1); torch.set_grad_enabled(False)
L = 60  # layers' worth of (16, 576, 16) / (16, 16, 1536) stacks, ~ cold in cache
A = [torch.randn(16, 576, 16) for _ in range(L)]; Bm = [torch.randn(16, 16, 1536) for _ in range(L)]
Ah = [a.bfloat16() for a in A]; Bh = [b.bfloat16() for b in Bm]
x = torch.randn(16, 1, 576); out = torch.randn(16, 1, 1536)
def f32():
    for a, b in zip(A, Bm): out.baddbmm_(torch.bmm(x, a), b)
def bf16():
    xh = x.bfloat16()
    for a, b in zip(Ah, Bh): out.add_(torch.bmm(torch.bmm(xh, a), b))
for name, f in (("fp32", f32), ("bf16", bf16)) * 3:
    f(); t0 = time.perf_counter(); f(); f(); print(name, round((time.perf_counter() - t0) / 2 * 1e3, 1), "ms for", L, "layers")
