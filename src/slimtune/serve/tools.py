"""Tool calling on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls`, tool results back.

    tools ─► the model's chat template (`apply_chat_template(tools=...)`); a template that ignores
             them gets a system message listing them (Hermes-style `<tool_call>` instructions)
    tool_choice "none"      ─► plain text (tools still shown to the model, as OpenAI does)
                "auto"      ─► free text; `<tool_call>{"name", "arguments"}</tool_call>` blocks in it
                               become `tool_calls` (the format Hermes, Qwen and SmolLM3 templates use)
                "required"  ─► grammar-constrained (grammar.py): a JSON array of calls to the given
                / named        tools, each call's arguments following that tool's parameter schema
                               (one call, not an array, with parallel_tool_calls: false or a named tool)
    assistant messages with `tool_calls` and `tool` messages with results go back through the template.
"""
from __future__ import annotations

import json
import re
import uuid

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class ToolError(ValueError):
    """tools / tool_choice that cannot be used; the message says why (a 400)."""


def functions(tools: list[dict] | None) -> dict[str, dict]:
    """name -> function spec, every tool checked: {"type": "function", "function": {"name", "parameters"}}."""
    out = {}
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"parameters\": {...}}}}")
        out[fn["name"]] = fn
    return out


def mode(tool_choice, fns: dict[str, dict]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", the named function)."""
    if tool_choice is None:
        return ("auto" if fns else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice '{tool_choice}' is not one of none, auto, required, or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if tool_choice != "none" and not fns:
            raise ToolError(f"tool_choice '{tool_choice}' needs tools")
        return tool_choice, None
    name = ((tool_choice or {}).get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in fns:
        raise ToolError(f"tool_choice names the function '{name}', which is not among the tools")
    return "named", name


def call_schema(fns: dict[str, dict], named: str | None, parallel: bool) -> dict:
    """The JSON schema a constrained answer follows: one call, or an array of calls."""
    def one(fn):
        return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                 "arguments": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}

    if named is not None:
        return one(fns[named])
    calls = [one(fn) for fn in fns.values()]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": item, "minItems": 1} if parallel else item


def render_tools(tok, messages: list[dict], fns: dict[str, dict], chat_prompt) -> list[int]:
    """Token ids of the chat prompt with the tools shown to the model."""
    tools = [{"type": "function", "function": fn} for fn in fns.values()]
    with_tools = chat_prompt(tok, messages, tools=tools)
    if with_tools != chat_prompt(tok, messages):
        return with_tools
    listing = "\n".join(json.dumps(fn) for fn in fns.values())
    system = {"role": "system", "content": (
        "You may call functions. Available functions:\n" + listing + "\nTo call one, answer with "
        "<tool_call>{\"name\": NAME, \"arguments\": {...}}</tool_call>.")}
    return chat_prompt(tok, [system] + messages)


def _call(obj) -> dict:
    args = obj.get("arguments", {}) if isinstance(obj, dict) else {}
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj.get("name", "") if isinstance(obj, dict) else "",
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse(text: str, how: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer."""
    if how in ("required", "named"):  # the grammar made it a call or an array of calls
        try:
            obj = json.loads(text)
        except ValueError:
            return text, []  # cut by max_tokens: the text as it is, no call
        return None, [_call(o) for o in (obj if isinstance(obj, list) else [obj])]
    if how == "auto":
        calls = []
        for block in TOOL_CALL.findall(text):
            try:
                calls.append(_call(json.loads(block)))
            except ValueError:
                continue
        if calls:
            rest = TOOL_CALL.sub("", text).strip()
            return rest or None, calls
    return text, []


def message_in(m) -> dict:
    """A request message for the chat template: text, plus tool_calls / tool_call_id when present."""
    out = {"role": m.role, "content": m.text()}
    if getattr(m, "tool_calls", None):
        out["tool_calls"] = [{**c, "function": {**c.get("function", {}),
                                                "arguments": _args(c.get("function", {}).get("arguments"))}}
                             for c in m.tool_calls]
    if getattr(m, "tool_call_id", None):
        out["tool_call_id"] = m.tool_call_id
    return out


def _args(a):
    """OpenAI sends arguments as a JSON string; templates expect the object."""
    if isinstance(a, str):
        try:
            return json.loads(a)
        except ValueError:
            return a
    return a
