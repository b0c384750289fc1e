"""Side-by-side benchmarks of slimtune against HF PEFT (issue 5).

    python -m slimtune.bench --preset cpu            # SmolLM2-135M shape, 4×128, fp32, 2 threads
    python -m slimtune.bench --preset gpu-0.85b      # Llama 0.85B shape, 4×1024, bf16, SDPA
    python -m slimtune.bench --preset gpu-6.7b       # Llama-2-7B shape, 1×2048, bf16, SDPA

Entry points: `main(argv)` (the CLI; `slimtune bench` calls it) and `run_benchmark(preset, ...)`
(returns the result dict). Everything runs in one process on one random-init model, one batch
and one seed, so the ratios (to the frozen floor, to PEFT) are what to read.
"""
from .core import PRESETS, format_table, main, run_benchmark

__all__ = ["PRESETS", "format_table", "main", "run_benchmark"]
