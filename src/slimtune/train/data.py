"""Data: a local file (`datafiles.read_rows`) or a builtin -> tokenised train / validation examples.

Formats (`data.format`, `auto` detects from the columns; docs/data.md shows a file of each):
  classification  text (+ text_pair) + label  -> input_ids, label id
  instruction     alpaca: instruction / input / output -> prompt + answer, loss on the answer only
                  (`data.prompt_template` builds the prompt from any columns)
  chat            messages [{role, content}] via the tokenizer's chat template, loss on assistant turns
  sharegpt        chat from `conversations` [{from: human|gpt|system, value}]
  text            plain text for causal-LM training, loss on every token
  image           pixels (H x W floats) + label (the non-transformer example)

Bad data fails with one `DataError` naming the file, the row and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import DataConfig
from .datafiles import DataError, _missing, read_rows
from .tasks import get_task
from .prompts import (CHATML, IGNORE, _encode_chat, _encode_prompt_answer, _ids, _messages, ensure_chat_template,
                      render_prompt, uses_chat_template)

__all__ = ["IGNORE", "CHATML", "DataError", "Prepared", "read_rows", "detect_format", "prepare", "collate", "batch_rows",
           "render_prompt", "ensure_chat_template"]

SAMPLE_ROWS = 16  # chat / text validation rows kept as prompts for the report's generation samples


@dataclass
class Prepared:
    format: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] | None = None  # classification / image label names
    answers: list[str] | None = None  # short answer set of an LM task (for generated-answer accuracy)
    # prompts + references for generation; "row" is the index of the example in `eval` (or `test`) they begin
    eval_raw: list[dict[str, Any]] = field(default_factory=list)
    # the held-out test split (data.test / data.test_fraction), tokenised like validation; measured once
    # by compare / search at the end (`held_out()` is the view the evaluation reads), never for selection
    test: list[dict[str, Any]] = field(default_factory=list)
    test_raw: list[dict[str, Any]] = field(default_factory=list)
    # rows per split, how validation was made, token lengths, truncation and class counts (checks.py)
    stats: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def held_out(self) -> "Prepared":
        """This data with the test split in the place of validation (what `Evaluation.evaluate` reads)."""
        import dataclasses

        if not self.test:
            raise DataError(f"{self.source}: no test split; set data.test (a file) or data.test_fraction")
        return dataclasses.replace(self, eval=self.test, eval_raw=self.test_raw)


# ---- format ----------------------------------------------------------------------------------------

def detect_format(rows: list[dict[str, Any]], cfg: DataConfig, source: str, task: str = "auto") -> str:
    fmt = "chat" if cfg.format == "sharegpt" else cfg.format
    keys = set(rows[0])
    if fmt == "auto":
        if "images" in keys and cfg.chat_column() in keys:
            fmt = "vision_chat"  # chat rows with images (tasks/vlm_io.py)
        elif cfg.chat_column() in keys or "conversations" in keys:
            fmt = "chat"
        elif cfg.output_column in keys and ("instruction" in keys or cfg.prompt_template):
            fmt = "instruction"
        elif "pixels" in keys:
            fmt = "image"
        elif "image" in keys:
            fmt = "image_files"
        elif "audio" in keys:
            fmt = "audio_files" if cfg.label_column in keys else "speech"  # a class, or a transcript
        elif cfg.text_column in keys and cfg.label_column in keys:
            fmt = "classification"
        elif cfg.text_column in keys:
            fmt = "text"
        else:
            fmt = None
    spec = get_task(task) if task != "auto" else None
    if spec is not None:  # the task's own rules for the data it takes (tasks/)
        spec.check_format(fmt, keys, cfg, source)
    if fmt is None:
        raise DataError(f"{source}: cannot tell the data format from the columns {sorted(keys)}; set data.format "
                        "to classification (text, label), instruction (instruction, input, output), chat "
                        "(messages), sharegpt (conversations) or text (text), or name your columns with "
                        "data.text_column / data.label_column / data.messages_column")
    return fmt


def _need(rows, cols, source, fmt):
    for i, r in enumerate(rows, 1):
        for c in cols:
            if c not in r or _missing(r[c]):
                what = "no" if c not in r else "an empty"
                raise DataError(f"{source}: row {i} has {what} '{c}' column (format {fmt} needs {', '.join(cols)}); "
                                f"the row has {sorted(map(str, r))}: fill it in, drop the row, or set data.{_col_key(c)}")


def _col_key(c):
    return {"text": "text_column", "label": "label_column", "messages": "messages_column",
            "output": "output_column", "conversations": "messages_column"}.get(c, "format")


# ---- splits ----------------------------------------------------------------------------------------

def split_seed(cfg: DataConfig, train_seed: int) -> int:
    """The seed the validation and test splits are carved with: data.split_seed (null: train.seed)."""
    return train_seed if cfg.split_seed is None else cfg.split_seed


def carve(rows: list, n: int, seed: int) -> tuple[list, list]:
    """(rest, carved): `n` rows chosen by a seeded shuffle (through `datasets`, so the split equals
    the one earlier versions made). A held-out test split (separate from the validation split that
    picks the best checkpoint) is carved the same way, from the rows before validation is taken."""
    import datasets

    idx = datasets.Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(
        test_size=n, seed=seed, shuffle=True)
    return [rows[i] for i in idx["train"]["i"]], [rows[i] for i in idx["test"]["i"]]


def test_split(rows: list, cfg: DataConfig, seed: int, source: str, stats: dict) -> tuple[list, list]:
    """(rows, test rows): the data.test file, else `test_fraction` of the rows carved off first (so
    validation and training never see them), else no test split."""
    if cfg.test and cfg.test_fraction:
        raise DataError(f"data.test={cfg.test!r} and data.test_fraction={cfg.test_fraction} are both set; keep one")
    if cfg.test:
        test = read_rows(cfg.test)
    elif cfg.test_fraction:
        n = min(max(1, round(len(rows) * cfg.test_fraction)), cfg.max_test or len(rows), len(rows) - 2)
        if n < 1:
            raise DataError(f"{source}: {len(rows)} examples are too few to carve a test split from; add examples, "
                            "give data.test, or set data.test_fraction=0")
        rows, test = carve(rows, n, seed)
        stats["test"] = f"carved {len(test)} of {len(rows) + len(test)} examples (split seed {seed}) before validation"
        return rows, test
    else:
        return rows, []
    stats["test"] = f"{len(test)} examples from data.test"
    return rows, test[:cfg.max_test] if cfg.max_test else test


def split(rows: list, val_rows: list | None, cfg: DataConfig, seed: int, source: str, stats: dict) -> tuple[list, list]:
    """train and validation rows: the validation file, else `val_fraction` of train carved off."""
    if val_rows is None:
        if len(rows) < 2:
            raise DataError(f"{source}: {len(rows)} example cannot be split into train and validation; add examples "
                            "or give data.validation")
        n_val = max(1, round(len(rows) * cfg.val_fraction))
        if cfg.max_eval:
            n_val = min(n_val, cfg.max_eval)
        n_val = min(n_val, len(rows) - 1)
        rows, val_rows = carve(rows, n_val, seed)
        stats["validation"] = f"carved {len(val_rows)} of {len(rows) + len(val_rows)} examples (split seed {seed})"
    else:
        stats["validation"] = f"{len(val_rows)} examples from data.validation"
    if cfg.max_train:
        rows = rows[:cfg.max_train]
    if cfg.max_eval:
        val_rows = val_rows[:cfg.max_eval]
    return rows, val_rows


# ---- the whole preparation -------------------------------------------------------------------------

def prepare(cfg: DataConfig, tok, task: str, seed: int, log=print) -> Prepared:
    from .datasets_offline import load_builtin

    info: dict[str, Any] = {}
    if cfg.builtin:
        try:
            rows, fmt, info = load_builtin(cfg.builtin)
        except ValueError as e:
            raise DataError(str(e)) from None
        source = f"builtin:{cfg.builtin}"
        if cfg.format != "auto" and cfg.format != fmt:
            raise DataError(f"{source} is {fmt} data; remove data.format or set it to {fmt}")
        if task != "auto":
            get_task(task).check_builtin(fmt, source)
    else:
        rows = read_source(cfg.train, cfg)
        source = cfg.train
        fmt = detect_format(rows, cfg, source, task)
    val_rows, val_source = (read_source(cfg.validation, cfg), cfg.validation) if cfg.validation else (None, source)
    stats: dict[str, Any] = {"max_length": cfg.max_length}
    number_media_rows(fmt, rows, val_rows)
    all_rows = rows if val_rows is None else None  # carved: the label set comes from every row
    seed = split_seed(cfg, seed)
    rows, test_rows = test_split(rows, cfg, seed, source, stats)
    rows, val_rows = split(rows, val_rows, cfg, seed, source, stats)
    stats["rows_train"], stats["rows_validation"] = len(rows), len(val_rows)
    if test_rows:
        stats["rows_test"] = len(test_rows)
    lengths: list[int] = []
    out = Prepared(format=fmt, train=[], eval=[], source=source, stats=stats)
    if fmt == "speech":
        from .tasks.speech_recognition import prepare_speech

        prepare_speech(cfg, tok, rows, val_rows, test_rows, source, val_source, out, lengths)
    elif fmt == "vision_chat":
        from .tasks.vlm_io import prepare_vision_chat

        prepare_vision_chat(cfg, tok, rows, val_rows, test_rows, source, val_source, out, lengths)
    elif fmt in ("classification", *INPUT_COLUMN):
        _classification(cfg, tok, fmt, info, rows, val_rows, all_rows, source, val_source, out, lengths, test_rows)
    elif fmt in ("instruction", "chat", "text"):
        _language(cfg, tok, fmt, rows, val_rows, source, val_source, out, lengths, test_rows)
        answers = info.get("answers")
        if answers is None and fmt == "instruction" and out.eval_raw:
            refs = [e["reference"] for e in out.eval_raw]
            if max(len(x.split()) for x in refs) <= 3:
                answers = sorted(set(refs)) if len(set(refs)) <= 20 else None
        out.answers = answers
    else:
        raise DataError(f"unknown data format {fmt}")
    stats["lengths"] = lengths
    stats["truncated"] = sum(n > cfg.max_length for n in lengths)
    if not out.train:
        raise DataError(f"{source}: no usable training examples after tokenisation (all answers truncated away?); "
                        "raise data.max_length")
    if not out.eval:
        raise DataError(f"{val_source}: no usable validation examples; give more data or data.validation")
    if test_rows and not out.test:
        raise DataError(f"{cfg.test or source}: no usable test examples after tokenisation; raise data.max_length")
    if stats["truncated"]:
        log(f"data: truncation to max_length={cfg.max_length} cut {stats['truncated']} of "
            f"{len(lengths)} examples (raise data.max_length to keep them whole)")
    return out


def read_source(path: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """A data file's rows, or a folder's: one row per image in a subfolder per class (tasks/media.py)."""
    from pathlib import Path

    if Path(path).is_dir():
        from .tasks.media import folder_rows

        return folder_rows(path, label_column=cfg.label_column)
    return read_rows(path)


ROW = "_row"  # a media row's number in its file, kept through the splits so a bad file's message names it


def number_media_rows(fmt: str, rows: list[dict], val_rows: list[dict] | None) -> None:
    """Stamp each media row (image / audio files) with its row number in the file (1-based) before the
    seeded splits reorder them: a corrupt file or a bad row is then named by its place in the file."""
    from .tasks.media import MEDIA_FORMATS

    if fmt in MEDIA_FORMATS:
        for part in (rows, val_rows or []):
            for n, r in enumerate(part, 1):
                if isinstance(r, dict):
                    r.setdefault(ROW, n)


# the column holding each example's input, per classification format
INPUT_COLUMN = {"image": "pixels", "image_files": "image", "audio_files": "audio"}


def _encode_media(fmt: str, proc, row: dict[str, Any], source: str, i: int) -> dict[str, Any]:
    """One row of a media format -> its input tensors (the task modules' encoders)."""
    from .tasks import audio_io
    from .tasks import image_classification as img

    if fmt == "image":
        return img.encode_grid(row, source, i)
    encode = {"image_files": img.encode_file, "audio_files": audio_io.encode_audio}[fmt]
    return encode(proc, row, INPUT_COLUMN[fmt], source, i)


def _classification(cfg, tok, fmt, info, rows, val_rows, all_rows, source, val_source, out, lengths, test_rows=()):
    cols = [INPUT_COLUMN.get(fmt, cfg.text_column), cfg.label_column]
    if fmt == "classification" and cfg.text_pair_column:
        cols.append(cfg.text_pair_column)
    from .tasks.media import refuse_media_labels, refuse_media_text

    if fmt == "classification":
        refuse_media_text(rows, cfg.text_column, source)
    _need(rows, cols, source, fmt)
    refuse_media_labels(rows, cfg.label_column, source)
    _need(val_rows, cols, val_source, fmt)
    _need(test_rows, cols, cfg.test or source, fmt)
    seen = all_rows if all_rows is not None else rows
    labels = cfg.labels or info.get("labels") or sorted({str(r[cfg.label_column]) for r in seen})
    labels = [str(x) for x in labels]
    if len(set(labels)) < 2:
        raise DataError(f"{source}: the label column {cfg.label_column!r} holds one class ({labels[0]!r}) in all "
                        f"{len(seen)} rows; a classifier needs at least 2. Is data.label_column the column with the "
                        f"classes? (columns: {sorted(map(str, rows[0]))})")
    out.labels = labels
    lid = {lab: i for i, lab in enumerate(labels)}
    counts: dict[str, dict[str, int]] = {"train": {}, "validation": {}, **({"test": {}} if test_rows else {})}
    for split_rows, src, dst, name in ((rows, source, out.train, "train"), (val_rows, val_source, out.eval, "validation"),
                                       (test_rows, cfg.test or source, out.test, "test")):
        for i, r in enumerate(split_rows, 1):
            lab = str(r[cfg.label_column])
            if lab not in lid:
                raise DataError(f"{src}: row {i} has label {lab!r}, which is not in the label set {labels}; "
                                "fix the row or add the label to data.labels")
            counts[name][lab] = counts[name].get(lab, 0) + 1
            if fmt in INPUT_COLUMN:  # pixels (a grid in the row, an image file) or audio: tasks/
                dst.append({**_encode_media(fmt, tok, r, src, r.get(ROW, i)), "labels": lid[lab]})
                lengths.append(0)
                continue
            args = (str(r[cfg.text_column]),) + ((str(r[cfg.text_pair_column]),) if cfg.text_pair_column else ())
            enc = tok(*args)
            lengths.append(len(enc["input_ids"]))
            if len(enc["input_ids"]) > cfg.max_length:
                enc = tok(*args, truncation=True, max_length=cfg.max_length)
            dst.append({"input_ids": enc["input_ids"], "labels": lid[lab],
                        **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {})})
    if fmt in ("image", "image_files") and len({tuple(e["pixel_values"].shape) for e in out.train + out.eval}) > 1:
        raise DataError(f"{source}: the images have different shapes; every 'pixels' grid must be the same size")
    out.stats["class_counts"] = counts


def _language(cfg, tok, fmt, rows, val_rows, source, val_source, out, lengths, test_rows=()):
    special = not uses_chat_template(tok, cfg)
    n_empty = 0
    col = cfg.chat_column()
    splits = [(rows, source, out.train, None), (val_rows, val_source, out.eval, out.eval_raw)]
    if test_rows:
        splits.append((list(test_rows), cfg.test or source, out.test, out.test_raw))
    for split_rows, src, dst, raws in splits:  # raws: where a held-out split keeps its prompts
        if fmt == "instruction":
            need = [cfg.output_column] + ([] if cfg.prompt_template else ["instruction"])
            _need(split_rows, need, src, fmt)
        elif fmt == "chat":
            c = col if col in split_rows[0] or cfg.messages_column else "conversations"
            _need(split_rows, [c], src, fmt)
        else:
            _need(split_rows, [cfg.text_column], src, fmt)
        for i, r in enumerate(split_rows, 1):
            raw = None
            if fmt == "instruction":
                prompt = render_prompt(tok, r, cfg, f"{src}: row {i}")
                ex, n = _encode_prompt_answer(tok, prompt, str(r[cfg.output_column]), cfg.max_length, special)
                n_prompt = sum(1 for lab in ex["labels"] if lab == IGNORE)
                raw = {"prompt": prompt, "prompt_ids": ex["input_ids"][:n_prompt], "reference": str(r[cfg.output_column])}
            elif fmt == "chat":
                msgs = _messages(r[c], src, i)
                try:
                    ex, n, last = _encode_chat(tok, msgs, cfg.max_length)
                except Exception as e:  # noqa: BLE001 - jinja's TemplateError, ValueError from transformers
                    if type(e).__name__ not in ("TemplateError", "TemplateSyntaxError", "UndefinedError", "ValueError"):
                        raise
                    raise DataError(f"{src}: row {i}: the model's chat template refuses this conversation ({e}); "
                                    "check the order of its roles (many templates want user/assistant turns to "
                                    "alternate)") from None
                if last is not None and last[0] < cfg.max_length:
                    raw = {"prompt": None, "prompt_ids": ex["input_ids"][:last[0]], "reference": last[1]}
            else:
                ids = _ids(tok, str(r[cfg.text_column]), True)
                if tok.eos_token_id is not None:
                    ids.append(tok.eos_token_id)
                n = len(ids)
                ex = {"input_ids": ids[:cfg.max_length], "labels": ids[:cfg.max_length]}
                k = min(16, len(ex["input_ids"]) // 2)
                if k:
                    raw = {"prompt": None, "prompt_ids": ex["input_ids"][:k],
                           "reference": tok.decode(ex["input_ids"][k:k + 32], skip_special_tokens=True)}
            lengths.append(n)
            if all(lab == IGNORE for lab in ex["labels"]):
                n_empty += 1
                continue
            dst.append(ex)
            if raws is not None and raw is not None and (fmt == "instruction" or len(raws) < SAMPLE_ROWS):
                raw["row"] = len(dst) - 1  # its example in `dst`: the prompt ids are that example's first tokens
                raws.append(raw)
    if n_empty:
        out.stats["dropped_no_answer"] = n_empty


# ---- batching ------------------------------------------------------------------------------------

def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    if "input_values" in examples[0] or "input_features" in examples[0]:  # audio (tasks/audio_io.py)
        from .tasks.audio_io import collate_audio

        return collate_audio(examples)
    if "media" in examples[0]:  # chat rows with images (tasks/vlm_io.py)
        from .tasks.vlm_io import collate_vlm

        return collate_vlm(examples, pad_id)
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


def batch_rows(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """The examples a causal-LM batch holds, pads removed: (input_ids, labels) per row, whatever the
    layout (right-padded rows with an attention mask, or flattened rows: packing.py). For checks and
    benchmarks."""
    if "cu_seq_lens_q" in batch:
        from .packing import packed_rows

        return packed_rows(batch)
    out = []
    for ids, mask, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = mask.bool()
        out.append((ids[keep].tolist(), lab[keep].tolist()))
    return out
