"""Text in and out: prompts as `slimtune generate` builds them, and streamed text with stop strings.

In: /v1/chat/completions renders the messages with the tokenizer's chat template (ChatML when it
has none, as `slimtune generate --chat` does) and tokenizes without special tokens (the template
has them); /v1/completions tokenizes the raw prompt with them (`generate --no-chat`).

Out: `TextStream` turns token ids into text deltas. It decodes a sliding window of ids (the
vLLM-style prefix/read offsets) so each token costs a short decode, holds back an incomplete
UTF-8 character and the last len(stop)-1 characters (a stop string may still be forming), and
at the end reconciles with one full decode, so the streamed pieces add up to exactly the
non-streamed text.
"""
from __future__ import annotations

from typing import Any


class PromptError(ValueError):
    """A prompt the tokenizer or chat template cannot take; the message says why."""


def chat_prompt(tok, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
    from ..train.data import ensure_chat_template

    ensure_chat_template(tok)
    try:
        kw = {"tools": tools} if tools else {}
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
    except Exception as e:  # noqa: BLE001 - jinja raises its own types (e.g. "roles must alternate")
        raise PromptError(f"the chat template rejected these messages: {e}") from None
    return encode(tok, text, special=False)


def encode(tok, text: str, special: bool = True) -> list[int]:
    try:
        return tok(text, add_special_tokens=special)["input_ids"]
    except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the Rust tokenizer cannot encode
        raise PromptError(f"the prompt cannot be tokenized ({type(e).__name__}: {e})") from None


class TextStream:
    def __init__(self, tok, stop: list[str] | None = None) -> None:
        self.tok = tok
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one matched)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string matched
        self._prefix = self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        """Add generated ids; returns the new text that is safe to hand out now."""
        if self.stopped or not ids:
            return ""
        self.ids += ids
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            start = max(len(self.text) - self.hold - 8, 0)
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self._check_stop(start)
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text once generation ended (reconciled with a full decode)."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text[: self.sent]):
                self.text = full
                self._check_stop(max(self.sent - self.hold, 0))
        return self._take(final=True)

    def _check_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(len(self.text) - self.hold, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out
