"""Structured output: `response_format` json_object / json_schema by grammar-constrained decoding.

The grammar library is llguidance (Microsoft's Rust Earley parser with a lazy lexer, the one vLLM and
SGLang also ship). Chosen over the other maintained ones on this project's terms, all three having
CPU wheels here: xgrammar requires triton and apache-tvm-ffi on Linux x86-64 (a GPU compiler to
install for a CPU server), outlines-core compiles each schema to a regex and then an index over the
whole vocabulary up front (seconds per schema for a 49k vocabulary, and no recursive schemas);
llguidance has no dependencies, compiles a schema in milliseconds and computes each step's mask
lazily (see docs/serving.md for the measured cost per token).

    response_format ─► grammar (json schema)  ─► a matcher per choice (HTTP side: a bad schema is a 400)
                    ─► fast_forward: the tokens it forces first join the prompt (one prefill forward)
    engine, per step, rows with a matcher:  fill their bitmask rows (one batched call) ─► + 0 / -inf bias
                                            ─► sample ─► consume the tokens (one batched call);
                                               a stopped matcher ends the row

Rows without a matcher are untouched, so constrained and free rows share one mixed batch.
"""
from __future__ import annotations

import json
import sys
import threading

import torch
import torch.nn.functional as F


class GrammarError(ValueError):
    """A response_format that does not compile; the message says why."""


class Grammars:
    """The server's llguidance tokenizer (built once, on first use) and a matcher per request."""

    def __init__(self, tokenizer, vocab: int, eos_ids: list[int]) -> None:
        self.tokenizer, self.vocab, self.eos_ids = tokenizer, vocab, eos_ids
        self._lt = None
        self._lock = threading.Lock()

    def _ll(self):
        with self._lock:
            if self._lt is None:
                import llguidance.hf

                self._lt = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab,
                                                        eos_token=self.eos_ids[0] if self.eos_ids else None)
            return self._lt

    def grammar(self, response_format) -> str | None:
        """llguidance's grammar for an OpenAI `response_format` (None for plain text)."""
        kind = response_format.type
        if kind == "text":
            return None
        if kind == "json_object":
            return self.schema_grammar({"type": "object"})
        return self.schema_grammar(response_format.json_schema.schema_ or {})

    def schema_grammar(self, schema: dict) -> str:
        """llguidance's grammar for a JSON schema (checked against the tokenizer)."""
        from llguidance import LLMatcher

        try:  # compact JSON: no free whitespace for a weak model to wander in
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"the JSON schema cannot be used: {str(e)[:500]}") from None
        is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, self._ll())
        if is_error:
            raise GrammarError(f"the JSON schema cannot be used: {'; '.join(msgs)[:500]}")
        return grammar

    def matcher(self, grammar: str):
        from llguidance import LLMatcher

        m = LLMatcher(self._ll(), grammar)
        if m.is_error():
            raise GrammarError(f"the JSON schema cannot be used: {m.get_error()[:500]}")
        return m


_LUT: dict = {}  # device -> (256, 8) float32: a byte's 8 bits (least significant first) as 0 / -inf


def _byte_bias(device) -> torch.Tensor:
    if device not in _LUT:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _LUT[device] = torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf")).to(device)
    return _LUT[device]


def constrain(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """logits (B, V) with each constrained row's forbidden tokens at -inf (a new float32 tensor: the
    log-probs read the model's own logits; rows without a matcher are as they were). matchers: one per
    row, None for a free row.

    llguidance fills a packed bitmask (R, ceil(V / 32)) int32, bit t of word w = token 32w + t. Read as
    bytes (little-endian: byte 4w + b holds tokens 32w + 8b ...), one embedding lookup into a
    (256, 8) table of 0 / -inf turns it into an additive (R, V) bias: one gather and one add for all
    rows (measured ~0.25 ms for 16 x 49,152 on 2 cores, against ~2 ms for unpacking the bits by shifts;
    llguidance.torch's own apply goes through torch.compile: seconds on its first call)."""
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    mask = allocate_token_bitmask(len(rows), vocab)
    # every row's mask in one call (llguidance's pool, GIL released): 0.04-0.6 ms for 16 rows here,
    # against 0.1-1.2 ms one Rust call per row
    fill_next_token_bitmask_par(_executor(), [(matchers[i], j) for j, i in enumerate(rows)], mask)
    if sys.byteorder != "little":  # the byte view below assumes it; the shift unpack does not
        allowed = ((mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten(1)[:, :vocab]
        bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).to(logits.device)
    else:
        bias = F.embedding(mask.view(torch.uint8).long().to(logits.device),
                           _byte_bias(logits.device)).flatten(1)[:, :vocab]  # (R, V)
    if len(rows) == logits.shape[0]:
        return logits.float() + bias
    return logits.float().index_add(0, torch.tensor(rows, device=logits.device), bias)


def fast_forward(matcher, limit: int) -> list[int]:
    """The tokens the grammar forces from the matcher's state (llguidance's ff tokens, e.g.
    `{"sentiment":"` for an object whose first property is required), at most `limit`, consumed
    into the matcher. They need no sampling: the caller appends them to the prompt, so one prefill
    forward computes them with the prompt, and hands them out as generated tokens."""
    ff = matcher.compute_ff_tokens()[:max(limit, 0)]
    if ff and not matcher.consume_tokens(ff):
        raise GrammarError(f"the grammar refused its own forced tokens: {matcher.get_error()[:300]}")
    return ff


def advance(matchers: list, tokens: list[int]) -> list[bool]:
    """Feed each constrained row its chosen token (one batched call); True where the grammar is
    complete (the row ends)."""
    pairs = [(m, t) for m, t in zip(matchers, tokens) if m is not None]
    if pairs:
        _executor().consume_token_par(pairs)  # a refused token leaves its matcher stopped in error: the row ends
    return [m is not None and m.is_stopped() for m in matchers]


_EXEC: list = []


def _executor():
    """llguidance's thread pool for the batched mask and consume calls, as many threads as torch
    uses: the calls run between forwards, not beside them."""
    if not _EXEC:
        import llguidance

        _EXEC.append(llguidance.LLExecutor(max(torch.get_num_threads(), 1)))
    return _EXEC[0]
