"""Chat rows with images for a vision-language model: reading, encoding, batching, generating.
Not a task itself (image_text_to_text.py registers the task; this is its data side).

A row (LLaMA-Factory's and unsloth's form):

    {"messages": [{"role": "user", "content": "<image>What colour is this?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["img/1.png"]}

Each `<image>` placeholder takes the next file of `images` (paths relative to the data file); the
counts must agree. Contents may also be the processors' list form ([{"type": "image"}, {"type":
"text", "text": ...}]). The text is the processor's chat template; the processor expands each
image into the model's image tokens and makes its pixels. Labels: the assistant turns' tokens,
-100 elsewhere (the prompt, the images, the user turns).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..datafiles import DataError
from .media import media_path

PLACEHOLDER = "<image>"
IGNORE = -100
# tensors the processors return per sample with a leading batch dim of 1 and the images on dim 1
# (Idefics3 / SmolVLM: (1, images, 3, H, W)); the others hold one entry per image on dim 0 (LLaVA)
PER_SAMPLE = {"pixel_values": 5, "pixel_attention_mask": 4}


def image_count(content: Any) -> int:
    if isinstance(content, str):
        return content.count(PLACEHOLDER)
    if isinstance(content, list):
        return sum(1 for c in content if isinstance(c, dict) and c.get("type") == "image")
    return 0


def to_parts(content: Any) -> list[dict[str, Any]]:
    """A message content with `<image>` placeholders -> the processors' parts ({"type": "image"} /
    {"type": "text"}), which every VLM chat template renders."""
    if isinstance(content, list):
        return [c if c.get("type") != "image" else {"type": "image"} for c in content]
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(str(content).split(PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def row_images(row: dict[str, Any], messages: list[dict], source: str, i: int, column: str = "images") -> list[str]:
    """The row's image paths, checked against its `<image>` placeholders (one message per mismatch)."""
    imgs = row.get(column)
    imgs = [] if imgs is None else [imgs] if isinstance(imgs, str) else list(imgs)
    n = sum(image_count(m.get("content")) for m in messages)
    if n != len(imgs):
        raise DataError(f"{source}: row {i} has {n} {PLACEHOLDER} placeholder(s) in its messages but {len(imgs)} "
                        f"image(s) in {column!r}; put one {PLACEHOLDER} in the text where each image goes (in order) "
                        "or fix the images list")
    return [str(media_path(p, source)) for p in imgs]


def messages_of(row: dict[str, Any], column: str, source: str, i: int) -> list[dict[str, Any]]:
    msgs = row.get(column)
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise DataError(f"{source}: row {i}: {column!r} must be a list of messages "
                        "({'role': 'user' | 'assistant', 'content': ...}); fix the row or set data.messages_column")
    return msgs


def render(proc: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    chat = [{"role": m["role"], "content": to_parts(m.get("content", ""))} for m in messages]
    return proc.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)


def load_images(paths: list[str], source: str, i: int) -> list:
    from .image_classification import open_image

    return [open_image(Path(p), f"{source}: row {i}") for p in paths]


def encode(proc: Any, text: str, images: list) -> dict[str, torch.Tensor]:
    """The processor's tensors for one sample (its image tokens expanded, its pixels)."""
    return dict(proc(text=[text], images=[images] if images else None, return_tensors="pt"))


def encode_row(proc: Any, row: dict[str, Any], column: str, source: str, i: int, max_length: int) -> dict[str, Any]:
    """One chat row -> {input_ids, labels, media (pixel tensors), prompt, images, reference}. Each
    assistant turn is labelled from the length of the encoded conversation before it (with the
    generation prompt) to the length of the conversation through it."""
    msgs = messages_of(row, column, source, i)
    paths = row_images(row, msgs, source, i)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{source}: row {i} does not end with an assistant message; the model learns the assistant's "
                        "answers: end each row with one")
    images = load_images(paths, source, i)
    enc = encode(proc, render(proc, msgs, False), images)
    ids = enc.pop("input_ids")[0].tolist()
    enc.pop("attention_mask", None)
    labels = [IGNORE] * len(ids)
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = sum(image_count(x.get("content")) for x in msgs[:k])
            start = len(encode(proc, render(proc, msgs[:k], True), images[:before])["input_ids"][0])
            end = len(encode(proc, render(proc, msgs[:k + 1], False), images[:before + image_count(m.get("content"))])
                      ["input_ids"][0])
            labels[start:end] = ids[start:end]
    if len(ids) > max_length:
        img_pos = [p for p, t in enumerate(ids) if t == getattr(proc, "image_token_id", None)]
        if img_pos and img_pos[-1] >= max_length:
            raise DataError(f"{source}: row {i} is {len(ids)} tokens with its images, past data.max_length="
                            f"{max_length}, and cutting it would cut an image; raise data.max_length")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        raise DataError(f"{source}: row {i}: no assistant token is left to learn (empty answers, or cut by "
                        f"data.max_length={max_length}); fill in the answer or raise data.max_length")
    last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
    n_prompt_images = sum(image_count(x.get("content")) for x in msgs[:last])
    return {"input_ids": ids, "labels": labels, "media": enc, "prompt": render(proc, msgs[:last], True),
            "images": paths[:n_prompt_images], "reference": answer_text(msgs[last].get("content"))}


def answer_text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text").strip()
    return str(content or "").strip()


def collate_vlm(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token rows padded on the right (labels with -100), the images' tensors joined: per-image
    tensors (LLaVA) on dim 0; per-sample ones (Idefics3) padded with empty images to the batch's
    most images (the model drops all-zero images)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        ids[i, :L] = torch.tensor(e["input_ids"])
        mask[i, :L] = 1
        labels[i, :L] = torch.tensor(e["labels"])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out.update(join_media([e["media"] for e in examples]))
    return out


def join_media(media: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = sorted({k for m in media for k in m})
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        have = [m[k] for m in media if k in m]
        if PER_SAMPLE.get(k) == have[0].ndim:
            most = max(t.shape[1] for t in have)
            shape = have[0].shape[2:]
            rows = []
            for m in media:
                t = m.get(k, torch.zeros((1, 0, *shape), dtype=have[0].dtype))
                pad = torch.zeros((1, most - t.shape[1], *shape), dtype=t.dtype)
                rows.append(torch.cat([t, pad], 1))
            out[k] = torch.cat(rows)
        else:
            out[k] = torch.cat(have)
    return out


@torch.no_grad()
def generate_answers(base: torch.nn.Module, proc: Any, prompts: list[str], images: list[list], max_new_tokens: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to rendered prompts (each with its PIL images), batched with left padding."""
    from transformers import GenerationMixin

    tok = proc.tokenizer
    dev = next(base.parameters()).device
    gen = getattr(base, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) or tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            texts, imgs = prompts[s:s + batch_size], images[s:s + batch_size]
            enc = proc(text=texts, images=imgs if any(imgs) else None, padding=True, return_tensors="pt")
            enc = {k: v.to(dev) for k, v in enc.items()}
            ids = GenerationMixin.generate(base, **enc, max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=eos, pad_token_id=pad)
            out += [t.strip() for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return out


def normalise(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", s.lower()).split())


def answer_metrics(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Exact match of the normalised answer (lower case, punctuation dropped), and token F1 (SQuAD's)."""
    from collections import Counter

    em, f1 = 0, 0.0
    for h, r in zip(hyps, refs):
        h, r = normalise(h), normalise(r)
        em += h == r
        common = sum((Counter(h.split()) & Counter(r.split())).values())
        if common:
            p, q = common / len(h.split()), common / len(r.split())
            f1 += 2 * p * q / (p + q)
    n = max(len(refs), 1)
    return {"exact_match": em / n, "answer_f1": f1 / n}


def prepare_vision_chat(cfg, proc, rows, val_rows, test_rows, source, val_source, out, lengths) -> None:
    """Chat rows with images -> examples (encode_row) in out.train / out.eval / out.test."""
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise DataError(f"{source}: the rows are chats with images (column 'images'), but the model is not a "
                        "vision-language model; use one (LLaVA, Idefics3 / SmolVLM, ...: a folder with its "
                        "AutoProcessor) with task: image_text_to_text, or drop the images for a text model")
    col = cfg.chat_column()
    for split_rows, src, dst in ((rows, source, out.train), (val_rows, val_source, out.eval),
                                 (list(test_rows), cfg.test or source, out.test)):
        for i, r in enumerate(split_rows, 1):
            ex = encode_row(proc, r, col, src, r.get("_row", i), cfg.max_length)  # _row: its place in the file (data.py)
            lengths.append(len(ex["input_ids"]))
            dst.append(ex)
