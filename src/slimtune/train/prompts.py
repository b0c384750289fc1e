"""From a row to tokens: the prompt of an instruction example (`data.prompt_template`, the chat
template, the alpaca layout), chat messages (role/content or ShareGPT from/value) with labels on
the assistant turns only, and prompt + answer with truncation that keeps the answer.
"""
from __future__ import annotations

import json
from typing import Any

from .config import DataConfig
from .datafiles import DataError

IGNORE = -100
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def ensure_chat_template(tok) -> None:
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML


class _Columns(dict):
    def __missing__(self, key):
        raise KeyError(key)


def uses_chat_template(tok, cfg: DataConfig) -> bool:
    return cfg.chat_template if cfg.chat_template is not None else bool(getattr(tok, "chat_template", None))


def render_prompt(tok, row: dict[str, Any], cfg: DataConfig, where: str = "the row") -> str:
    """The prompt of an instruction example: the user turn (`data.prompt_template` over the row's
    columns, else instruction + a blank line + input) through the chat template when one is used
    (instruct models), else the prompt text itself, or without a template the alpaca layout."""
    if cfg.prompt_template:
        cols = _Columns({str(k): ("" if v is None else v) for k, v in row.items()})
        try:
            user = cfg.prompt_template.format_map(cols)
        except KeyError as e:
            raise DataError(f"{where}: data.prompt_template uses {{{e.args[0]}}}, but the row has no such column "
                            f"(columns: {sorted(cols)})") from None
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise DataError(f"{where}: data.prompt_template cannot be filled in from this row ({e})") from None
    else:
        ins, inp = str(row.get("instruction", "")), str(row.get("input") or "")
        user = f"{ins}\n\n{inp}" if inp.strip() else ins
    if uses_chat_template(tok, cfg):
        ensure_chat_template(tok)
        msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []) + \
               [{"role": "user", "content": user}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if cfg.prompt_template:
        return user
    ins, inp = str(row.get("instruction", "")), str(row.get("input") or "")
    return "### Instruction:\n" + ins + (f"\n\n### Input:\n{inp}" if inp.strip() else "") + "\n\n### Response:\n"


def _ids(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def _encode_prompt_answer(tok, prompt: str, answer: str, max_len: int, special: bool):
    p = _ids(tok, prompt, special=special)
    a = _ids(tok, answer, special=False)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    a = a + eos
    n = len(p) + len(a)
    if n > max_len:  # keep the answer, the prompt's first tokens (template header) and its end (the
        # question); cut the middle. Cutting from the left would drop the header of long prompts only,
        # a length cue a model learns instead of the task (seen: plot summaries are the long texts).
        room = max_len - len(a)
        head = min(16, room // 4) if room > 0 else 0
        p = (p[:head] + p[len(p) - (room - head):]) if room > 0 else []
        a = a[:max_len - len(p)]
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}, n


def _encode_chat(tok, messages, max_len: int):
    """Token ids, labels on assistant turns, the full length, and (start, text) of the last answer."""
    ensure_chat_template(tok)
    ids: list[int] = []
    labels: list[int] = []
    last = None
    for i, m in enumerate(messages):
        full = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if m["role"] == "assistant":
            if i:
                prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                done = tok.apply_chat_template(messages[:i], tokenize=False)
            else:  # the conversation opens with the assistant: its header is what a generation prompt adds
                probe = [{"role": "user", "content": ""}]
                done = tok.apply_chat_template(probe, tokenize=False)
                prefix = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)[len(done):]
                done = ""
            gen = prefix[len(done):] if prefix.startswith(done) else prefix
            ans = full[len(prefix):] if full.startswith(prefix) else m["content"]
            g, a = _ids(tok, gen, False), _ids(tok, ans, False)
            ids += g
            last = (len(ids), m["content"])
            ids += a
            labels += [IGNORE] * len(g) + a
        else:
            done = tok.apply_chat_template(messages[:i], tokenize=False) if i else ""
            t = _ids(tok, full[len(done):] if full.startswith(done) else full, False)
            ids += t
            labels += [IGNORE] * len(t)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}, len(ids), last


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system"}


def _messages(raw, src, i):
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{src}: row {i}: the messages are a string that is not JSON; give a list of "
                            "{role, content} objects") from None
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{src}: row {i}: the messages must be a non-empty list of {{role, content}} objects "
                        "(or ShareGPT {from, value})")
    msgs = []
    for m in raw:
        if not isinstance(m, dict):
            raise DataError(f"{src}: row {i}: each message must be an object with role and content; got {m!r:.80}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = _ROLES.get(role.strip().lower()) if isinstance(role, str) else None
        if role is None or content is None or isinstance(content, (dict, list)):
            raise DataError(f"{src}: row {i}: message {m!r:.120} needs a role (system, user/human, assistant/gpt) "
                            "and a text content (or value)")
        msgs.append({"role": role, "content": str(content)})
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{src}: row {i} has no assistant message: nothing to learn from; add the answer turn")
    return msgs
