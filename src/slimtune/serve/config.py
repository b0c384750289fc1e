"""`ServeConfig`: every limit the server enforces, with the reason for its default.

One typed object is built by the CLI (`slimtune serve --max-batch ...`) or by a test, and read by
the engine (batch and queue sizes), the registry (resident adapters) and the app (request limits).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback: a server is reachable from elsewhere only when told so
    port: int = 8000
    served_model_name: str = "base"  # the base model's id in /v1/models and the `model` field
    # engine
    max_batch: int = 32  # rows decoded together; on 2 CPU cores a step of 32 rows of a 135M model
    #                      is ~3x a step of 1, so more rows trade latency for little throughput
    prefill_tokens: int = 2048  # prompt tokens prefilled per step: bounds the stall running rows see
    #                             when many requests join at once (one prompt longer than this still goes)
    admit_wait_ms: float = 20.0  # with no row running, the first request back waits up to this long for the
    #                              others of its wave (clients answered in one step come back within a few ms),
    #                              so they share one prefill and one new batch instead of two (docs/serving.md)
    admit_gap_ms: float = 3.0  # ... and stops waiting once no request has arrived for this long: a lone
    #                            request on an idle server waits this, not admit_wait_ms; 0 = no gathering
    prefix_cache_tokens: int = 8192  # prompt-prefix KV kept for reuse (0 = off): ~380 MB for SmolLM2-135M
    #                                  in fp32; chat prompts share their template and system prompt
    prefix_block: int = 16  # tokens per cached block: a prefix is reused in whole blocks
    max_queue: int = 256  # requests waiting for a batch slot before new ones get 429
    allow_adapter_paths: tuple[str, ...] = ()  # roots besides --adapters-dir that API loads may read (paths.py)
    mixed_adapter_dtype: str = "model"  # LoRA weights a mixed batch reads: "model" (the base's dtype,
    #                     exact) or "bfloat16" (half the bytes per decode step, widened to fp32 as read: only the
    #                     weights are rounded; needs the lora_rows kernel, whose registers do the widening)
    lora_kernel: str = "auto"  # mixed decode steps through kernels/lora_rows (built at start-up, cached):
    #                            "auto" says so and keeps torch's bmm if it cannot build, "on" refuses to start
    #                            then, "off" is torch's bmm; measured in docs/serving.md
    dedicated_cpus: bool = False  # the server has its CPUs to itself: keep one OpenMP pool (the engine's), whose
    #                               workers then spin between a step's ops instead of sleeping (faster steps);
    #                               off by default: beside other busy processes or under a CPU quota spinning
    #                               workers stall behind them (serve/openmp.py, measured in docs/serving.md)
    max_loaded: int = 16  # adapters resident in memory; the least recently used is evicted beyond it
    #                       (a LoRA r=16 on all linears of a 135M model is ~20 MB)
    # requests
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON holds a ~250k-token prompt: far past any limit below
    max_prompt_tokens: int = 4096  # also capped by the model's context length
    max_audio_bytes: int = 25 << 20  # /v1/audio/transcriptions uploads: OpenAI's limit (25 MB)
    max_audio_seconds: float = 120.0  # a clip's length (a Whisper base: also its 30 s window); CTC attention
    #                                   is quadratic in it, ~6,000 frames for 120 s
    max_tokens: int = 1024  # the largest `max_tokens` a request may ask for
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions without max_tokens
    max_n: int = 8  # choices per request (`n` x prompts): each is a row in the batch
    max_stop: int = 4  # stop sequences per request (OpenAI's limit)
    request_timeout_s: float = 600.0  # a request still running after this is cancelled (408)
    retry_after_s: int = 1  # Retry-After on 429 when the queue is full
    insecure: bool = False  # allow a non-loopback bind without --keys
