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
            rest = TOOL_CALL.sub("", text)
            return (rest.rstrip() if rest.strip() else None), calls
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


# ---- streaming: delta.tool_calls pieces while the text grows -----------------------------------------

OPEN = "<tool_call>"


def scan_calls(text: str) -> list[list]:
    """The calls in a (partial) JSON answer: a call object `{"name", "arguments": {...}}`, or an array
    of them. Per call, what is there so far: [name or None, where its `arguments` object starts or
    None, where it ends or None (still open)]. One pass with a container stack; strings are skipped
    whole (a string still open ends the scan)."""
    calls: list[list] = []
    depth = 0
    call_depth = None  # 1: one call object; 2: an array of calls
    key, want_key = None, False  # at the call's depth: the key just read / a key comes next
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j, esc = i + 1, False
            while j < n and (esc or text[j] != '"'):
                esc = not esc and text[j] == "\\"
                j += 1
            if j >= n:
                break
            if depth == call_depth and calls:
                if want_key:
                    key, want_key = text[i + 1:j], False
                elif key == "name" and calls[-1][0] is None:
                    try:
                        calls[-1][0] = json.loads(text[i:j + 1])
                    except ValueError:
                        calls[-1][0] = text[i + 1:j]
            i = j + 1
            continue
        if ch in "{[":
            if call_depth is None and ch == "{":
                call_depth = depth + 1
            if ch == "{" and depth + 1 == call_depth:
                calls.append([None, None, None])
                key, want_key = None, True
            elif depth == call_depth and key == "arguments" and calls and calls[-1][1] is None:
                calls[-1][1] = i
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == call_depth and key == "arguments" and calls and calls[-1][1] is not None:
                calls[-1][2] = i + 1
                key = None
        elif ch == "," and depth == call_depth:
            key, want_key = None, True
        i += 1
    return calls


class ToolStream:
    """One choice's tool calls as OpenAI streams them: per call a first piece with its index, id,
    type and function name, then pieces of `function.arguments` (the raw JSON text of the arguments
    object, so the pieces join into a parseable string) as the model writes them.

    required / named: the whole answer is the JSON of the call(s) (the grammar makes it so).
    auto: text before the first `<tool_call>` block streams as content (trailing spaces and what
    may be the start of the tag are held back); each block's JSON streams as a call; text after the
    first block is sent at the end, so that the content joins into exactly what the non-streamed
    answer gives (tools.parse)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.text = ""
        self.ids: list[str] = []
        self.sent: list[int] = []  # argument characters sent, per call
        self.upto = 0  # auto: content sent up to here
        self.blocks = False  # auto: a block has started

    def push(self, delta: str) -> tuple[str, list[dict]]:
        """(content to send, tool-call pieces to send) after `delta` more text."""
        self.text += delta
        if self.how != "auto":
            return "", self._pieces([(c, self.text) for c in scan_calls(self.text)])
        content = ""
        start = self.text.find(OPEN)
        if not self.blocks:
            end = start if start >= 0 else len(self.text) - next(
                (k for k in range(min(len(OPEN), len(self.text)), 0, -1) if OPEN.startswith(self.text[-k:])), 0)
            end = len(self.text[:end].rstrip())  # trailing spaces wait: they may come before a block
            if end > self.upto and self.text[:end].strip():  # so does an answer of spaces only
                content, self.upto = self.text[self.upto:end], end
            if start < 0:
                return content, []
            self.blocks = True
        found = []
        for m in re.finditer(re.escape(OPEN) + r"(.*?)(?:</tool_call>|$)", self.text, re.S):
            calls = scan_calls(m.group(1))
            if calls:
                found.append((calls[0], m.group(1)))
        return content, self._pieces(found)

    def _pieces(self, found: list[tuple[list, str]]) -> list[dict]:
        out = []
        for j, ((name, start, end), text) in enumerate(found):
            if name is None:
                continue
            if j >= len(self.ids):
                self.ids.append("call_" + uuid.uuid4().hex[:24])
                self.sent.append(0)
                out.append({"index": j, "id": self.ids[j], "type": "function",
                            "function": {"name": name, "arguments": ""}})
            if start is not None:
                args = text[start:end if end is not None else len(text)]
                if len(args) > self.sent[j]:
                    out.append({"index": j, "function": {"arguments": args[self.sent[j]:]}})
                    self.sent[j] = len(args)
        return out

    def finish(self) -> str:
        """auto: the content not yet sent (what was held back; text outside the blocks after the first)."""
        if self.how != "auto":
            return ""
        if not self.blocks:
            return self.text[self.upto:]
        rest = TOOL_CALL.sub("", self.text[self.upto:]).rstrip()
        return rest if self.upto or rest.strip() else ""
