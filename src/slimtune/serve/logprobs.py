"""Log-probabilities of chosen tokens and their top alternatives, and OpenAI's two shapes for them.

Engine side (tensor ops, once per forward for the rows that asked): log_softmax of the model's own
logits (before logit_bias, penalties or temperature: the distribution of the adapter itself, what
evaluation harnesses score), the chosen token's value by gather, the top k by one topk over the
rows that asked. `prompt_entries` does the same for every prompt position of an `echo` row (token j
scored by the logits at j - 1; the first token has none), which is what log-likelihood evaluation
(lm-eval's `local-completions`) needs.

An entry is (token id, logprob, [(id, logprob), ...]); the HTTP side turns entries into
/v1/completions' `{tokens, token_logprobs, top_logprobs, text_offset}` or chat's `{content: [...]}`.
"""
from __future__ import annotations

import re

import torch

Entry = tuple  # (token id, logprob, [(id, logprob), ...])


def step_entries(logits: torch.Tensor, tokens: torch.Tensor, ks: list[int | None]) -> list[Entry | None]:
    """logits (B, V), chosen tokens (B,), each row's top-k (None: the row did not ask)."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[Entry | None] = [None] * len(ks)
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    lsm = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)  # (R, V)
    chosen = lsm.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1).tolist()
    kmax = max(ks[i] for i in rows)
    top_v, top_i = lsm.topk(kmax, dim=-1) if kmax else (lsm[:, :0], lsm[:, :0].long())
    top_v, top_i, toks = top_v.tolist(), top_i.tolist(), tokens.index_select(0, idx).tolist()
    for j, i in enumerate(rows):
        k = ks[i]
        out[i] = (toks[j], chosen[j], list(zip(top_i[j][:k], top_v[j][:k])))
    return out


def prompt_entries(logits: torch.Tensor, prompt: list[int], k: int) -> list[Entry | None]:
    """logits (L, V) over one row's prompt positions -> an entry per prompt token (the first: None)."""
    if len(prompt) < 2:
        return [None] * len(prompt)
    lsm = torch.log_softmax(logits[:-1].float(), dim=-1)  # position j - 1 scores token j
    ids = torch.tensor(prompt[1:], device=logits.device)
    chosen = lsm.gather(1, ids[:, None]).squeeze(1).tolist()
    top_v, top_i = lsm.topk(k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [None] + [(t, c, list(zip(ti, tv))) for t, c, ti, tv in zip(prompt[1:], chosen, top_i, top_v)]


# ---- the HTTP shapes --------------------------------------------------------------------------------------
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tok):
    """id -> the token's own bytes (chat log-probs' `bytes`), by the tokenizer's kind:
    byte-level BPE (GPT-2, SmolLM2, Llama 3): a piece is bytes spelt through GPT-2's byte-to-unicode map,
    and can hold part of a UTF-8 character, which the decoded string shows as U+FFFD; SentencePiece's
    byte fallback: `<0xE6>` is that byte; anything else (WordPiece, whole SentencePiece pieces, special
    tokens): the decoded string's UTF-8. The tables are built on first use: a speech server's
    "tokenizer" is a processor, and only chat log-probs need them."""
    from functools import cache

    @cache
    def tables() -> tuple[bool, dict[str, int], set[int]]:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        return (type(decoder).__name__ == "ByteLevel", {c: b for b, c in bytes_to_unicode().items()},
                set(tok.all_special_ids))

    def one(i: int) -> bytes:
        byte_level, inverse, special = tables()
        piece = tok.convert_ids_to_tokens(i)
        if i not in special and byte_level and all(c in inverse for c in piece):
            return bytes(inverse[c] for c in piece)
        if m := _BYTE_PIECE.fullmatch(piece or ""):
            return bytes([int(m.group(1), 16)])
        return tok.decode([i], skip_special_tokens=False).encode("utf-8")

    return one


def _strings(tok, ids: list[int]) -> list[str]:
    return tok.batch_decode([[i] for i in ids], skip_special_tokens=False)


def completion_shape(tok, entries: list[Entry | None], ids: list[int], offset: int = 0) -> dict:
    """/v1/completions' legacy shape for `ids` (their entries; None = no score, e.g. the first prompt token).
    top_logprobs holds the top k and the chosen token, as vLLM does."""
    words = _strings(tok, ids + [a for e in entries if e for a, _ in e[2]])
    names = dict(zip(ids + [a for e in entries if e for a, _ in e[2]], words))
    tokens, lps, tops, offs = [], [], [], []
    pos = offset
    for i, e in zip(ids, entries):
        tokens.append(names[i])
        offs.append(pos)
        pos += len(names[i])
        if e is None:
            lps.append(None)
            tops.append(None)
            continue
        top = {names[a]: v for a, v in e[2]}
        top.setdefault(names[e[0]], e[1])
        lps.append(e[1])
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def chat_shape(tok, entries: list[Entry], token_bytes) -> list[dict]:
    """Chat's `logprobs.content`: one item per generated token, with its top alternatives. `bytes` is the
    token's own bytes (token_bytes(id)), not its decoded string's: a token holding part of a multi-byte
    character decodes to U+FFFD, and a client joins the pieces' bytes to get the character back."""
    ids = [e[0] for e in entries] + [a for e in entries for a, _ in e[2]]
    names = dict(zip(ids, _strings(tok, ids)))

    def item(i, v):
        return {"token": names[i], "logprob": v, "bytes": list(token_bytes(i))}

    return [{**item(e[0], e[1]), "top_logprobs": [item(a, v) for a, v in e[2]]} for e in entries]
