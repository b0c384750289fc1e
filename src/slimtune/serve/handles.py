"""What a caller hands the engine and gets back: `GenRequest` in, a `Handle` out, `Event`s on it.

Events travel as (tag, Event) on a queue: an asyncio.Queue filled from the engine thread by
`loop.call_soon_threadsafe` (the HTTP side; several choices of one request may share one queue,
told apart by tag), or a thread-safe queue for callers without an event loop (`Handle.result()`).
"""
from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass
from typing import Any

from ..methods.lora_layers import BASE_ADAPTER


class QueueFull(Exception):
    """The waiting queue is at max_queue."""


class EngineStopped(RuntimeError):
    pass


@dataclass
class GenRequest:
    prompt: list[int]  # token ids
    adapter: str = BASE_ADAPTER  # a registry name, or BASE_ADAPTER for the base model
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    timeout_s: float | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks compare equal work)
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None  # log-probs of each chosen token and its top k alternatives (None: off)
    echo: bool = False  # also the prompt tokens' log-probs (first event)
    matcher: Any = None  # an llguidance matcher: structured output (grammar.py), one per choice


@dataclass
class Event:
    tokens: list[int]
    finish: str | None = None  # "stop" (EOS), "length", "cancelled", "timeout", "error"
    error: BaseException | None = None
    logprobs: list | None = None  # per token: (id, logprob, [(id, logprob), ...]) (logprobs.py)
    prompt_logprobs: list | None = None  # per prompt token (the first: None), with `echo`


class Handle:
    """A submitted request: its events, `cancel()`, and timing for metrics."""

    def __init__(self, req: GenRequest, engine, loop: asyncio.AbstractEventLoop | None,
                 sink: Any = None, tag: int = 0) -> None:
        self.req = req
        self.loop = loop
        # items are (tag, Event); several handles (the choices of one request) may share one sink
        self.queue: Any = sink if sink is not None else asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.tag = tag
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.deadline = self.t_submit + req.timeout_s if req.timeout_s else None
        self.t_first: float | None = None
        self._engine = engine

    def cancel(self) -> None:
        """The client went away (or a stop string matched): the row leaves at the next step."""
        self.cancelled = True
        self._engine.wake()

    async def events(self):
        while True:
            _, ev = await self.queue.get()
            yield ev
            if ev.finish is not None:
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """Blocking (for callers without an event loop): all tokens and the finish reason."""
        toks: list[int] = []
        end = time.monotonic() + timeout if timeout else None
        while True:
            _, ev = self.queue.get(timeout=None if end is None else max(end - time.monotonic(), 0.001))
            toks += ev.tokens
            if ev.error is not None:
                raise ev.error
            if ev.finish is not None:
                return toks, ev.finish
