"""Running a trained adapter on new rows (`slimtune predict`): a classifier's label and its
probability, or an LM's generated answer, for every row of a file or of stdin, in order.

    rows = read_inputs("new.csv")            # or "-" for stdin: JSON lines, or one text per line
    out = classify(model, tok, rows, labels, text_column="text")   # + {"label", "probability"}
    out = generate(model, tok, rows, data_cfg, max_new_tokens=64)  # + {"generated"}
    write_outputs(out, "pred.jsonl")         # .csv -> CSV; None -> stdout as JSON lines

Prompts are built as in training: instruction rows through the run's `data.prompt_template` /
chat template / system prompt, chat rows (`messages`) through the chat template, anything else
(`prompt`, `text`, a plain line) as one user turn.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any, Iterable

import torch

from .config import DataConfig
from .data import ensure_chat_template, render_prompt, uses_chat_template
from .datafiles import DataError, _read_json, decode, read_rows


def read_inputs(source: str, stdin=None) -> list[dict[str, Any]]:
    """Rows from a data file, or from stdin ("-"): JSON lines / a JSON array, else one text per line."""
    if source != "-":
        return read_rows(source)
    stream = stdin or sys.stdin
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode()
    text = decode(raw, "stdin")
    if text.lstrip()[:1] in ("{", "["):
        rows = _read_json(text, "stdin", ".jsonl")
    else:
        rows = [{"text": line} for line in text.splitlines() if line.strip()]
    if not rows:
        raise DataError("stdin: no input rows; pipe JSON lines or one text per line, or pass a file")
    return rows


def _text(row: dict[str, Any], column: str, i: int) -> str:
    if column in row and row[column] is not None:
        return str(row[column])
    if "text" in row and row["text"] is not None:
        return str(row["text"])
    raise DataError(f"input row {i} has no {column!r} column (it has {sorted(map(str, row))}); pass --column NAME")


@torch.no_grad()
def classify(model, tok, rows: list[dict[str, Any]], labels: list[str] | None, text_column: str = "text",
             pair_column: str | None = None, batch_size: int = 32, max_length: int = 512) -> list[dict[str, Any]]:
    """Each row plus `label` (the most probable class) and `probability` (its softmax probability)."""
    model.eval()
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        texts = [_text(r, text_column, s + j + 1) for j, r in enumerate(chunk)]
        pairs = [_text(r, pair_column, s + j + 1) for j, r in enumerate(chunk)] if pair_column else None
        enc = tok(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        dev = next(model.parameters()).device
        logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits.float()
        prob = logits.softmax(-1)
        p, idx = prob.max(-1)
        for r, i, q in zip(chunk, idx.tolist(), p.tolist()):
            name = labels[i] if labels and i < len(labels) else str(i)
            out.append({**r, "label": name, "probability": round(q, 6)})
    return out


def prompt_for(tok, row: dict[str, Any], data_cfg: DataConfig | None, i: int, fmt: str | None = None) -> str:
    """The prompt text for one input row, built the way training built it (`fmt` "text": a plain
    language model, whose prompt is the text itself)."""
    cfg = data_cfg or DataConfig()
    if fmt == "text":
        return _text(row, cfg.text_column, i)
    msgs = row.get(cfg.chat_column()) or row.get("messages") or row.get("conversations")
    if isinstance(msgs, list) and msgs:
        from .prompts import _messages

        ms = [m for m in _messages(msgs + [{"role": "assistant", "content": ""}], f"input row {i}", i)]
        while ms and ms[-1]["role"] == "assistant":  # generate the next assistant turn
            ms.pop()
        ensure_chat_template(tok)
        return tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=True)
    if cfg.prompt_template or "instruction" in row:
        return render_prompt(tok, row, cfg, f"input row {i}")
    text = row.get("prompt", row.get("text"))
    if text is None:
        raise DataError(f"input row {i} has no prompt: give 'instruction' (+ 'input'), 'messages', 'prompt' or 'text' "
                        f"(it has {sorted(map(str, row))})")
    return render_prompt(tok, {"instruction": str(text)}, cfg.model_copy(update={"prompt_template": None}))


@torch.no_grad()
def generate(model, tok, rows: list[dict[str, Any]], data_cfg: DataConfig | None, max_new_tokens: int = 64,
             batch_size: int = 16, temperature: float = 0.0, fmt: str | None = None) -> list[dict[str, Any]]:
    """Each row plus `generated`: batched, left-padded generation (greedy unless temperature > 0)."""
    model.eval()
    cfg = data_cfg or DataConfig()
    special = fmt == "text" or not uses_chat_template(tok, cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    side = tok.padding_side
    tok.padding_side = "left"
    out = []
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            prompts = [prompt_for(tok, r, data_cfg, s + j + 1, fmt) for j, r in enumerate(chunk)]
            enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=special)
            dev = next(model.parameters()).device
            enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tok.pad_token_id)
            if temperature > 0:
                kw.update(temperature=temperature, top_p=0.95)
            ids = model.generate(**enc, **kw)
            texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [{**r, "generated": t.strip()} for r, t in zip(chunk, texts)]
    finally:
        tok.padding_side = side
    return out


def write_outputs(rows: Iterable[dict[str, Any]], path: str | None, fmt: str | None = None) -> int:
    """JSON lines (default) or CSV (`fmt="csv"` or a .csv path) to a file, or to stdout."""
    rows = list(rows)
    fmt = fmt or ("csv" if path and path.endswith(".csv") else "jsonl")
    buf = io.StringIO()
    if fmt == "csv":
        keys: list[str] = []
        for r in rows:
            keys += [str(k) for k in r if str(k) not in keys]
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({str(k): json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
                        for k, v in r.items()})
    else:
        for r in rows:
            buf.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    if path:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    return len(rows)
