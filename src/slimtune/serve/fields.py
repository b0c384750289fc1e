"""Request fields other servers and SDKs send that this server takes without acting on them.

Clients nobody here wrote send fields for OpenAI's or vLLM's features: SDKs add `store` and
`service_tier`, benchmark tools send `repetition_penalty: 1.0` or vLLM's stream options. Refusing
them as unknown breaks those clients; ignoring a field that would change the answer silently
gives a wrong answer. So each such field is declared (schemas.py) with the value at which it
changes nothing here, and a request that sets it to anything else is one `unsupported_parameter`
400 naming the field and what to send instead.

`NEUTRAL[name] = (is_neutral(value), hint)`; docs/serving.md lists the same table. Fields the
server implements (penalties, top_k, logprobs, ...) are not here: they are schema fields with
their own checks.
"""
from __future__ import annotations

from typing import Any, Callable


def _always(v: Any) -> bool:
    return True


def _unset(v: Any) -> bool:
    return v is None


def _is(value: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v == value


# fields of both endpoints
COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "store": (_always, "nothing is stored; any value is accepted"),
    "metadata": (_always, "tags for stored completions; accepted and ignored (nothing is stored)"),
    "service_tier": (_always, "one tier here; any value is accepted"),
    "skip_special_tokens": (_is(True), "vLLM's option: special tokens are always left out of the text; leave it true"),
    "spaces_between_special_tokens": (_is(True), "vLLM's option; leave it true"),
    "include_stop_str_in_output": (_is(False), "vLLM's option: the stop string is never returned; leave it false"),
    "truncate_prompt_tokens": (_unset, "vLLM's option: prompts are never truncated; shorten the prompt instead"),
    "prompt_logprobs": (_unset, "vLLM's option; use `echo` with `logprobs` on /v1/completions"),
    "use_beam_search": (_is(False), "beam search is not implemented; leave it false"),
    "length_penalty": (_is(1.0), "only used by beam search; leave it at 1"),
    "prediction": (_unset, "predicted outputs are not implemented; leave it out"),
    "guided_json": (_unset, "not implemented; leave it out"),
    "guided_regex": (_unset, "not implemented; leave it out"),
    "guided_choice": (_unset, "not implemented; leave it out"),
    "guided_grammar": (_unset, "not implemented; leave it out"),
}

# /v1/chat/completions only
CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "modalities": (lambda v: v is None or list(v) == ["text"], "this model writes text only; send [\"text\"]"),
    "audio": (_unset, "this model writes text only; leave it out"),
    "reasoning_effort": (_unset, "this model has no reasoning mode; leave it out"),
    "web_search_options": (_unset, "web search is not available; leave it out"),
    "functions": (_unset, "the legacy functions API is not implemented; leave it out"),
    "function_call": (_unset, "the legacy functions API is not implemented; leave it out"),
    "add_generation_prompt": (_is(True), "vLLM's option: the assistant prompt is always added; leave it true"),
    "continue_final_message": (_is(False), "vLLM's option: not implemented; leave it false"),
    "echo": (_is(False), "vLLM's chat option: not implemented; use /v1/completions with echo"),
    "add_special_tokens": (_is(False), "vLLM's option: the chat template adds special tokens; leave it false"),
    "chat_template": (_unset, "the model's own chat template is always used; leave it out"),
    "chat_template_kwargs": (_unset, "the model's own chat template is always used; leave it out"),
}


def first_active(body, table: dict[str, tuple[Callable[[Any], bool], str]]) -> tuple[str, str] | None:
    """(field, message) for the first field of `table` set to a value that would change the answer."""
    for name, (neutral, hint) in table.items():
        v = getattr(body, name, None)
        if not neutral(v):
            return name, f"{name}={v!r} is not supported by this server: {hint}"
    return None
