"""Benchmark presets: model shapes and batch sizes for the CPU and GPU runs (issue 5's anchors)."""
from __future__ import annotations

from dataclasses import dataclass, field

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
LLAMA_085B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
LLAMA_67B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


@dataclass
class Preset:
    name: str
    model: dict
    batch: int
    seq: int
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 1  # untimed steps after each scenario's set-up
    steps: int = 3  # timed steps per round
    rounds: int = 1  # round-robin repeats of the training scenarios
    infer_rounds: int | None = None  # round-robin repeats of the inference scenarios (None: rounds)
    infer_steps: int = 3
    full: bool = True  # include full fine-tuning
    mixed_adapters: int = 8
    pairs: int = 24  # (floor, LoRA) step pairs of the paired estimate (--scenarios paired)
    r: int = 16
    alpha: int = 32
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # SmolLM2-135M shape, all 30 layers (fewer would flatter the floor ratio), 4×128, fp32, 2 threads.
    # 3 interleaved rounds: on a shared VM one round can run 10% slow for every scenario in it.
    # Inference varies less than training: 2 rounds keep the whole preset within 3 minutes.
    "cpu": Preset("cpu", SMOLLM2_135M, batch=4, seq=128, threads=2, warmup=1, steps=2, rounds=3,
                  infer_rounds=2, infer_steps=2, full=False),
    "gpu-0.85b": Preset("gpu-0.85b", LLAMA_085B, batch=4, seq=1024, dtype="bfloat16", device="cuda",
                        warmup=3, steps=10, infer_steps=10),
    "gpu-6.7b": Preset("gpu-6.7b", LLAMA_67B, batch=1, seq=2048, dtype="bfloat16", device="cuda",
                       warmup=3, steps=10, infer_steps=10, full=False),
    # A seconds-long smoke run of the whole pipeline (tests use it; not a measurement).
    "tiny": Preset("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128),
                   batch=2, seq=16, warmup=1, steps=1, rounds=1, infer_steps=1, full=True, mixed_adapters=3),
}
