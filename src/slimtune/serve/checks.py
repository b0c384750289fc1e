"""A generation request's checks, before any row runs: prompts -> token ids, limits, stop strings,
logit_bias, log-probs, structured output and tools. Each raises one APIError (a 4xx naming the
field and the fix); generation.py turns what they return into engine rows.
"""
from __future__ import annotations

from . import tools
from .errors import APIError
from .grammar import GrammarError
from .schemas import ChatRequest, CompletionRequest
from .text import PromptError, chat_prompt, encode


# what to do instead, per non-text content part
FIXES = {"image_url": " (images need a vision-language base: train one with task image_text_to_text and serve it)",
         "input_audio": " (to turn speech into text, POST the audio file to /v1/audio/transcriptions on a server "
                        "whose base is a speech recognizer, e.g. Whisper)",
         "file": " (paste the file's text into a text part)"}


def prompts(srv, body, fns: dict | None = None) -> list[list[int]]:
    tok = srv.tokenizer
    try:
        if isinstance(body, ChatRequest):
            for i, m in enumerate(body.messages):
                for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
                    if part.type != "text":
                        raise APIError(400, f"messages[{i}].content[{j}] is a '{part.type}' part; this model reads text "
                                       "only: send the content as a string or as parts of type 'text'"
                                       + FIXES.get(part.type, "") + ".", f"messages.{i}.content.{j}.type",
                                       "unsupported_content")
                    if part.text is None:
                        raise APIError(400, f"messages[{i}].content[{j}] is a text part without `text`.",
                                       f"messages.{i}.content.{j}.text", "invalid_value")
            msgs = [tools.message_in(m) for m in body.messages]
            out = [tools.render_tools(tok, msgs, fns, chat_prompt) if fns else chat_prompt(tok, msgs)]
        elif isinstance(body.prompt, str):
            out = [encode(tok, body.prompt)] if body.prompt else [[]]
        elif body.prompt and isinstance(body.prompt[0], str):
            out = [encode(tok, p) if p else [] for p in body.prompt]
        elif body.prompt and isinstance(body.prompt[0], list):
            out = [list(p) for p in body.prompt]
        else:
            out = [list(body.prompt)]
    except PromptError as e:
        raise APIError(400, str(e), "messages" if isinstance(body, ChatRequest) else "prompt", "invalid_prompt") from None
    if not out:
        raise APIError(400, "The prompt list is empty; send at least one prompt.", "prompt", "empty_prompt")
    for p in out:
        if not p:
            raise APIError(400, "The prompt is empty; send at least one token of text.", "prompt", "empty_prompt")
        if min(p) < 0 or max(p) >= srv.vocab_size:
            raise APIError(400, f"Token ids must be in [0, {srv.vocab_size}).", "prompt", "invalid_token_id")
    return out


def limits(srv, body, prompts: list[list[int]]) -> list[int]:
    cfg = srv.cfg
    asked = body.max_tokens
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        asked = body.max_completion_tokens
    if asked is not None and asked > cfg.max_tokens:
        raise APIError(400, f"max_tokens is {asked}; this server allows at most {cfg.max_tokens} (--max-tokens).",
                       "max_tokens", "max_tokens_too_large")
    out = []
    for p in prompts:
        if len(p) > srv.max_prompt_tokens:
            raise APIError(400, f"The prompt has {len(p)} tokens; this server takes at most {srv.max_prompt_tokens} "
                           "(--max-prompt-tokens, and the model's context). Shorten the prompt.",
                           "messages" if isinstance(body, ChatRequest) else "prompt", "context_length_exceeded")
        room = srv.context - len(p)
        default = cfg.default_completion_tokens if isinstance(body, CompletionRequest) else cfg.max_tokens
        n = asked if asked is not None else max(min(default, room), 1)
        if n > room:
            raise APIError(400, f"This model's maximum context length is {srv.context} tokens; the prompt has {len(p)} "
                           f"and max_tokens asks for {n}. Lower max_tokens or shorten the prompt.", "max_tokens",
                           "context_length_exceeded")
        out.append(n)
    return out


def stops(srv, stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > srv.cfg.max_stop:
        raise APIError(400, f"At most {srv.cfg.max_stop} stop sequences are allowed.", "stop", "too_many_stops")
    return stops


def logit_bias(srv, bias: dict[str, float] | None) -> dict[int, float] | None:
    """{"token id": bias} -> {id: bias}, every id a token of this model."""
    if not bias:
        return None
    out = {}
    for k, v in bias.items():
        if not (k.isdigit() and int(k) < srv.vocab_size):
            raise APIError(400, f"logit_bias key '{k}' is not a token id of this model (0 to {srv.vocab_size - 1}).",
                           "logit_bias", "invalid_value")
        out[int(k)] = float(v)
    return out


def tooling(srv, body) -> tuple[dict, str, str | None]:
    """(tools by name, how calls are made: none / auto / required / named, the grammar of a forced call)."""
    try:
        fns = tools.functions(body.tools)
        how, named = tools.mode(body.tool_choice, fns)
    except tools.ToolError as e:
        raise APIError(400, str(e), "tools" if "tools[" in str(e) else "tool_choice", "invalid_value") from None
    if how not in ("required", "named"):
        return fns, how, None
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "tool_choice required / a named function and response_format cannot be combined; "
                       "send one of them.", "response_format", "invalid_value")
    try:
        return fns, how, srv.grammars.schema_grammar(tools.call_schema(fns, named, body.parallel_tool_calls is not False))
    except GrammarError as e:
        raise APIError(400, f"a tool's parameters: {e}", "tools", "invalid_value") from None


def grammar(srv, body) -> str | None:
    """The grammar for chat's response_format (grammar.py), or None for free text; a bad schema is a 400."""
    fmt = getattr(body, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise APIError(400, "response_format json_schema needs json_schema: {name, schema}.",
                       "response_format.json_schema", "missing_required_parameter")
    try:
        return srv.grammars.grammar(fmt)
    except GrammarError as e:
        raise APIError(400, str(e), "response_format.json_schema.schema", "invalid_value") from None


def top_k(body) -> int | None:
    """How many alternatives per token to return (0: the chosen token only), or None: no log-probs."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", "top_logprobs", "invalid_value")
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs
