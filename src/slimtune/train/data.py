"""Data: local JSONL/JSON/CSV/Parquet (read with HF `datasets`) or a builtin -> tokenised examples.

Formats (`data.format`, `auto` detects from the columns):
  classification  text (+ text_pair) + label  -> input_ids, label id
  instruction     instruction / input / output (alpaca) -> prompt + answer, loss on the answer only
  chat            messages [{role, content}] via the tokenizer's chat template, loss on assistant turns
  text            plain text for causal-LM training, loss on every token
  image           pixels (H x W floats) + label (the non-transformer example)

Bad data fails with one `DataError` naming the file, the row and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig

IGNORE = -100
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class DataError(ValueError):
    """Unusable data; the message names the file, the row and the fix."""


@dataclass
class Prepared:
    format: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] | None = None  # classification / image label names
    answers: list[str] | None = None  # short answer set of an LM task (for generated-answer accuracy)
    eval_raw: list[dict[str, Any]] = field(default_factory=list)  # prompts + references for generation
    stats: dict[str, Any] = field(default_factory=dict)
    source: str = ""


# ---- reading -------------------------------------------------------------------------------------

def read_rows(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found (data paths are relative to the config file or the working dir)")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; put at least one example in it")
    suffix = "".join(p.suffixes[-2:]) if p.suffix in (".gz", ".bz2") else p.suffix
    if suffix in (".jsonl", ".json"):
        rows = _read_json(p)
    elif suffix in (".csv", ".tsv", ".parquet"):
        import datasets

        datasets.disable_progress_bars()
        kind = "parquet" if suffix == ".parquet" else "csv"
        kw = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train", **kw)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; name the file
            raise DataError(f"{path}: could not be read as {kind} ({type(e).__name__}: {str(e)[:300]}); "
                            f"check the file is valid {kind}") from None
        rows = ds.to_list()
    else:
        raise DataError(f"{path}: unknown file type '{p.suffix}'; use .jsonl, .json, .csv, .tsv or .parquet")
    if not rows:
        raise DataError(f"{path}: no examples in the file; put at least one example in it")
    return rows


def _read_json(p: Path) -> list[dict[str, Any]]:
    """JSON lines (one object per line) or a JSON array. Parsed here, line by line, so a broken row
    is reported with its line number; the rows then go into a `datasets.Dataset`."""
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix that line") from None
        rows = data
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: row at line {i} is not valid JSON ({e.msg}, column {e.colno}): "
                                f"{line[:80]!r}; each line must be one JSON object") from None
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise DataError(f"{p}: row {i} is {type(r).__name__}, not an object; each example must be a JSON object")
    if not rows:
        raise DataError(f"{p}: no examples in the file; put at least one example in it")
    import datasets

    try:  # through `datasets` for the same typing as CSV/Parquet (and to catch ragged columns)
        return datasets.Dataset.from_list(rows).to_list()
    except Exception:  # noqa: BLE001 - mixed types across rows: keep the plain rows
        return rows


def detect_format(rows: list[dict[str, Any]], cfg: DataConfig, source: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    keys = set(rows[0])
    if cfg.messages_column in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "instruction"
    if "pixels" in keys:
        return "image"
    if cfg.text_column in keys and cfg.label_column in keys:
        return "classification"
    if cfg.text_column in keys:
        return "text"
    raise DataError(f"{source}: cannot tell the data format from the columns {sorted(keys)}; set data.format to "
                    "classification (text, label), instruction (instruction, input, output), chat (messages) or text")


def _need(rows, cols, source, fmt):
    for i, r in enumerate(rows, 1):
        for c in cols:
            if c not in r or r[c] is None:
                raise DataError(f"{source}: row {i} has no '{c}' column (format {fmt} needs {', '.join(cols)}); "
                                f"the row has {sorted(r)}: rename the column or set data.{_col_key(c)}")


def _col_key(c):
    return {"text": "text_column", "label": "label_column", "messages": "messages_column"}.get(c, "format")


# ---- tokenisation --------------------------------------------------------------------------------

def ensure_chat_template(tok) -> None:
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML


def prompt_text(tok, instruction: str, inp: str = "", system: str | None = None) -> str:
    """The prompt of an instruction example: the chat template when the tokenizer has one (instruct
    models), else the alpaca template."""
    user = instruction if not inp else f"{instruction}\n\n{inp}"
    if getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = "### Instruction:\n" + instruction + (f"\n\n### Input:\n{inp}" if inp else "")
    return head + "\n\n### Response:\n"


def _ids(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def _encode_prompt_answer(tok, prompt: str, answer: str, max_len: int):
    p = _ids(tok, prompt, special=not getattr(tok, "chat_template", None))
    a = _ids(tok, answer, special=False)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    a = a + eos
    truncated = len(p) + len(a) > max_len
    if truncated:  # keep the answer, the prompt's first tokens (template header) and its end (the
        # question); cut the middle. Cutting from the left would drop the header of long prompts only,
        # a length cue a model learns instead of the task (seen: plot summaries are the long texts).
        room = max_len - len(a)
        head = min(16, room // 4) if room > 0 else 0
        p = (p[:head] + p[len(p) - (room - head):]) if room > 0 else []
        a = a[:max_len - len(p)]
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}, truncated


def _encode_chat(tok, messages, max_len: int):
    ensure_chat_template(tok)
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        full = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if m["role"] == "assistant":
            prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            done = tok.apply_chat_template(messages[:i], tokenize=False) if i else ""
            gen = prefix[len(done):] if prefix.startswith(done) else prefix
            ans = full[len(prefix):] if full.startswith(prefix) else m["content"]
            g, a = _ids(tok, gen, False), _ids(tok, ans, False)
            ids += g + a
            labels += [IGNORE] * len(g) + a
        else:
            done = tok.apply_chat_template(messages[:i], tokenize=False) if i else ""
            t = _ids(tok, full[len(done):] if full.startswith(done) else full, False)
            ids += t
            labels += [IGNORE] * len(t)
    truncated = len(ids) > max_len
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}, truncated


def prepare(cfg: DataConfig, tok, task: str, seed: int, log=print) -> Prepared:
    from .datasets_offline import load_builtin

    info: dict[str, Any] = {}
    if cfg.builtin:
        rows, fmt, info = load_builtin(cfg.builtin)
        source = f"builtin:{cfg.builtin}"
        if cfg.format != "auto" and cfg.format != fmt:
            raise DataError(f"{source} is {fmt} data; remove data.format or set it to {fmt}")
        val_rows, val_source = None, source
        if cfg.validation:
            val_rows, val_source = read_rows(cfg.validation), cfg.validation
    else:
        rows = read_rows(cfg.train)
        source = cfg.train
        fmt = detect_format(rows, cfg, source)
        val_rows, val_source = (read_rows(cfg.validation), cfg.validation) if cfg.validation else (None, source)

    stats: dict[str, Any] = {}
    if val_rows is None:  # carve a seeded validation split through `datasets`
        import datasets

        n_val = max(1, round(len(rows) * cfg.val_fraction))
        if cfg.max_eval:
            n_val = min(n_val, cfg.max_eval)
        if len(rows) < 2:
            raise DataError(f"{source}: 1 example cannot be split into train and validation; add examples or "
                            "give data.validation")
        idx = datasets.Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(
            test_size=n_val, seed=seed, shuffle=True)
        val_rows = [rows[i] for i in idx["test"]["i"]]
        rows = [rows[i] for i in idx["train"]["i"]]
        stats["validation"] = f"carved {len(val_rows)} of {len(rows) + len(val_rows)} examples (seed {seed})"
    if cfg.max_train:
        rows = rows[:cfg.max_train]
    if cfg.max_eval:
        val_rows = val_rows[:cfg.max_eval]

    out = Prepared(format=fmt, train=[], eval=[], source=source, stats=stats)
    if fmt in ("classification", "image"):
        cols = [cfg.text_column, cfg.label_column] if fmt == "classification" else ["pixels", cfg.label_column]
        if fmt == "classification" and cfg.text_pair_column:
            cols.append(cfg.text_pair_column)
        _need(rows, cols, source, fmt)
        _need(val_rows, cols, val_source, fmt)
        labels = cfg.labels or info.get("labels") or sorted({str(r[cfg.label_column]) for r in rows})
        labels = [str(x) for x in labels]
        out.labels = labels
        lid = {l: i for i, l in enumerate(labels)}
        for split_rows, src, dst in ((rows, source, out.train), (val_rows, val_source, out.eval)):
            for i, r in enumerate(split_rows, 1):
                lab = str(r[cfg.label_column])
                if lab not in lid:
                    raise DataError(f"{src}: row {i} has label {lab!r}, which is not in the label set {labels}; "
                                    "fix the row or add the label to data.labels")
                if fmt == "image":
                    dst.append({"pixel_values": torch.tensor(r["pixels"], dtype=torch.float32).unsqueeze(0), "labels": lid[lab]})
        if fmt == "classification":
            n_cut = 0
            for split_rows, dst in ((rows, out.train), (val_rows, out.eval)):
                for r in split_rows:
                    args = (str(r[cfg.text_column]),) + ((str(r[cfg.text_pair_column]),) if cfg.text_pair_column else ())
                    full = tok(*args)["input_ids"]
                    enc = tok(*args, truncation=True, max_length=cfg.max_length)
                    n_cut += len(full) > cfg.max_length
                    dst.append({"input_ids": enc["input_ids"], "labels": lid[str(r[cfg.label_column])],
                                **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {})})
            stats["truncated"] = n_cut
    elif fmt in ("instruction", "chat", "text"):
        if task == "classification":
            raise DataError(f"{source} is {fmt} data but the task is classification; use task: causal_lm")
        n_cut, n_empty = 0, 0
        for split_rows, src, dst, is_eval in ((rows, source, out.train, False), (val_rows, val_source, out.eval, True)):
            if fmt == "instruction":
                _need(split_rows, ["instruction", "output"], src, fmt)
            elif fmt == "chat":
                col = cfg.messages_column if cfg.messages_column in split_rows[0] else "conversations"
                _need(split_rows, [col], src, fmt)
            else:
                _need(split_rows, [cfg.text_column], src, fmt)
            for i, r in enumerate(split_rows, 1):
                if fmt == "instruction":
                    prompt = prompt_text(tok, str(r["instruction"]), str(r.get("input") or ""), cfg.system_prompt)
                    ex, cut = _encode_prompt_answer(tok, prompt, str(r["output"]), cfg.max_length)
                    if is_eval:  # the prompt exactly as trained on (truncated the same way)
                        n_prompt = sum(1 for l in ex["labels"] if l == IGNORE)
                        out.eval_raw.append({"prompt": prompt, "prompt_ids": ex["input_ids"][:n_prompt],
                                             "reference": str(r["output"])})
                elif fmt == "chat":
                    msgs = _messages(r[col], src, i)
                    ex, cut = _encode_chat(tok, msgs, cfg.max_length)
                else:
                    ids = _ids(tok, str(r[cfg.text_column]), True)
                    if tok.eos_token_id is not None:
                        ids.append(tok.eos_token_id)
                    cut = len(ids) > cfg.max_length
                    ex = {"input_ids": ids[:cfg.max_length], "labels": ids[:cfg.max_length]}
                n_cut += cut
                if all(l == IGNORE for l in ex["labels"]):
                    n_empty += 1
                    continue
                dst.append(ex)
        stats["truncated"] = n_cut
        if n_empty:
            stats["dropped_no_answer"] = n_empty
        answers = info.get("answers")
        if answers is None and out.eval_raw:
            refs = [e["reference"] for e in out.eval_raw]
            if max(len(x.split()) for x in refs) <= 3:
                answers = sorted(set(refs)) if len(set(refs)) <= 20 else None
        out.answers = answers
    else:
        raise DataError(f"unknown data format {fmt}")
    if not out.train:
        raise DataError(f"{source}: no usable training examples after tokenisation (all answers truncated away?); "
                        "raise data.max_length")
    if not out.eval:
        raise DataError(f"{val_source}: no usable validation examples; give more data or data.validation")
    if stats.get("truncated"):
        log(f"data: truncation to max_length={cfg.max_length} cut {stats['truncated']} of "
            f"{len(rows) + len(val_rows)} examples (raise data.max_length to keep them whole)")
    return out


def _messages(raw, src, i):
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(f"{src}: row {i}: messages is a string that is not JSON; give a list of "
                            "{{role, content}} objects") from None
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{src}: row {i}: messages must be a non-empty list of {{role, content}} objects")
    msgs = []
    for m in raw:
        if not isinstance(m, dict):
            raise DataError(f"{src}: row {i}: each message must be an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ("system", "user", "assistant") or content is None:
            raise DataError(f"{src}: row {i}: message {m!r} needs role system/user/assistant and content")
        msgs.append({"role": role, "content": str(content)})
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{src}: row {i} has no assistant message: nothing to learn from; add the answer turn")
    return msgs


# ---- batching ------------------------------------------------------------------------------------

def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    if "pixel_values" in examples[0]:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    seq_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long) if seq_labels else \
        torch.tensor([e["labels"] for e in examples])
    tt = torch.zeros((len(examples), n), dtype=torch.long) if "token_type_ids" in examples[0] else None
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        ids[i, :L] = torch.tensor(e["input_ids"])
        mask[i, :L] = 1
        if seq_labels:
            labels[i, :L] = torch.tensor(e["labels"])
        if tt is not None:
            tt[i, :L] = torch.tensor(e["token_type_ids"])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if tt is not None:
        out["token_type_ids"] = tt
    return out
