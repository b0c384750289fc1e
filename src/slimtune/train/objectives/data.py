"""TRL's dataset formats -> token ids, so a user's existing files work unchanged:

    pairs     (dpo ipo orpo simpo)  {prompt, chosen, rejected}: text, or conversational (lists of
              {role, content}); with conversational chosen/rejected the prompt may be left out
              (their shared first messages are the prompt, as TRL's extract_prompt does)
    unpaired  (kto)                 {prompt, completion, label}: label true = desirable
    prompts   (grpo)                {prompt, ...}: every other column (e.g. `answer`) goes to the reward functions

The chat template is applied as in SFT (prompts.uses_chat_template): a text prompt becomes the user
turn (after data.system_prompt) and the completion the assistant turn; without a template, text is
tokenised as it is and the completion ends with EOS (as TRL does). The completion starts where the
tokenised prompt and prompt + completion part (TRL's common-prefix rule), so loss falls on
completion tokens only. Bad rows are one DataError naming the row and the fix.
"""
from __future__ import annotations

from typing import Any

from ..config import JobConfig
from ..datafiles import DataError, _missing
from ..prompts import ensure_chat_template, uses_chat_template

ROLES = {"system", "user", "assistant"}


def _conv(v: Any, where: str, key: str) -> list[dict[str, str]] | str:
    """A column as text or a validated message list."""
    if isinstance(v, list):
        for m in v:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: '{key}' holds {m!r:.100}; each message needs a role (system, user, assistant) "
                                "and a text content")
        if not v:
            raise DataError(f"{where}: '{key}' is an empty message list; give the {key} text or messages")
        return v
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v)
    raise DataError(f"{where}: '{key}' is {type(v).__name__}; give text or a list of {{role, content}} messages")


def _need(row: dict[str, Any], keys: tuple[str, ...], where: str, what: str) -> None:
    missing = [k for k in keys if k not in row or _missing(row[k])]
    if missing:
        raise DataError(f"{where}: no {', '.join(repr(k) for k in missing)}; {what} (columns here: {sorted(row)})")


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Encoder:
    """Prompt / completion -> token ids for one job (tokenizer, chat template, length limits)."""

    def __init__(self, cfg: JobConfig, tok) -> None:
        self.tok, self.cfg = tok, cfg.data
        self.chat = uses_chat_template(tok, cfg.data)
        self.max_length = cfg.data.max_length
        self.max_prompt = cfg.train.max_prompt_length or cfg.data.max_length - 1
        self.truncated = 0

    def _as_chat(self, prompt, completion) -> tuple[Any, Any, bool]:
        conv = isinstance(prompt, list) or isinstance(completion, list)
        if not conv and not self.chat:
            return prompt, completion, False
        ensure_chat_template(self.tok)  # conversational rows on a template-less tokenizer: ChatML, as SFT's chat data
        if isinstance(prompt, str):
            prompt = ([{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt is not None
                      else []) + [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return prompt, completion, True

    def prompt_ids(self, prompt) -> list[int]:
        """The prompt as the model sees it before generating (GRPO): the generation prompt included."""
        prompt, _, conv = self._as_chat(prompt, "")
        if conv:
            text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(prompt)["input_ids"]

    def full_ids(self, prompt, completion) -> list[int]:
        prompt, completion, conv = self._as_chat(prompt, completion)
        if conv:
            text = self.tok.apply_chat_template(prompt + completion, tokenize=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        eos = self.tok.eos_token or ""
        return self.tok(prompt + (completion if completion.endswith(eos) else completion + eos))["input_ids"]

    def encode(self, prompt, completions: list[Any], where: str) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, completion ids per completion): the prompt ends where it and every prompt +
        completion stop agreeing; prompt + completion is cut at data.max_length (keep the start)."""
        p = self.prompt_ids(prompt)
        fulls = [self.full_ids(prompt, c) for c in completions]
        n = min(_common(p, f) for f in fulls)
        if n >= self.max_prompt:
            raise DataError(f"{where}: the prompt is {n} tokens, more than the limit of {self.max_prompt} "
                            f"(train.max_prompt_length, else data.max_length - 1): no room is left for the answer; "
                            "shorten the prompt, or raise data.max_length / train.max_prompt_length")
        outs = []
        for f in fulls:
            c = f[n:]
            if n + len(c) > self.max_length:
                c = c[:self.max_length - n]
                self.truncated += 1
            outs.append(c)
        return p[:n], outs


def _prompt_of(row: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a preference row; an implicit prompt is the shared first messages."""
    _need(row, ("chosen", "rejected"), where, "a preference row needs prompt, chosen and rejected (TRL's format)")
    chosen, rejected = _conv(row["chosen"], where, "chosen"), _conv(row["rejected"], where, "rejected")
    if "prompt" in row and not _missing(row["prompt"]):
        return _conv(row["prompt"], where, "prompt"), chosen, rejected
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k:
            return chosen[:k], chosen[k:], rejected[k:]
    raise DataError(f"{where}: no 'prompt'; a preference row needs prompt, chosen and rejected (or conversational "
                    "chosen / rejected that open with the same prompt messages)")


def encode_pairs(rows: list[dict[str, Any]], enc: Encoder, src: str) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        where = f"{src}: row {i}"
        prompt, chosen, rejected = _prompt_of(row, where)
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are the same ({str(chosen)[:60]!r}): the pair teaches "
                            "nothing; fix the rejected answer or drop the row")
        p, (c, r) = enc.encode(prompt, [chosen, rejected], where)
        ref = chosen if isinstance(chosen, str) else chosen[-1]["content"]
        out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "reference": ref.strip()})
    return out


def _label(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise DataError(f"{where}: label {v!r} is not true / false; KTO's label says whether the completion is "
                    "desirable (true) or not (false)")


def encode_unpaired(rows: list[dict[str, Any]], enc: Encoder, src: str) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        where = f"{src}: row {i}"
        _need(row, ("prompt", "completion", "label"), where, "an unpaired (KTO) row needs prompt, completion and label")
        p, (c,) = enc.encode(_conv(row["prompt"], where, "prompt"), [_conv(row["completion"], where, "completion")],
                             where)
        out.append({"prompt_ids": p, "completion_ids": c, "label": _label(row["label"], where)})
    if out and len({e["label"] for e in out}) == 1:
        raise DataError(f"{src}: every row's label is {out[0]['label']}; KTO needs desirable (true) and undesirable "
                        "(false) completions")
    return out


def encode_prompts(rows: list[dict[str, Any]], enc: Encoder, src: str) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        where = f"{src}: row {i}"
        _need(row, ("prompt",), where, "a GRPO row needs a prompt (other columns, e.g. answer, go to the rewards)")
        prompt = _conv(row["prompt"], where, "prompt")
        p = enc.prompt_ids(prompt)
        if len(p) > enc.max_prompt:
            raise DataError(f"{where}: the prompt is {len(p)} tokens, more than the limit of {enc.max_prompt} "
                            "(train.max_prompt_length, else data.max_length - 1); shorten it or raise the limit")
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        cols = {k: v for k, v in row.items() if k != "prompt"}
        out.append({"prompt_ids": p, "prompt": text, "columns": cols,
                    "reference": str(cols.get("answer", ""))})
    return out


ENCODERS = {"pairs": encode_pairs, "unpaired": encode_unpaired, "prompts": encode_prompts}


def prepare(cfg: JobConfig, tok, kind: str, log=print):
    """The job's data for an objective reading `kind` rows: a `Prepared` (train / validation examples)."""
    from ..data import Prepared, split, split_seed, test_split
    from ..datafiles import read_rows

    d = cfg.data
    if d.train is None:
        raise DataError(f"train.objective={cfg.train.objective} reads {kind} rows from a file: set data.train (e.g. a "
                        "JSONL of TRL-format rows; docs/objectives.md); builtin data sets are SFT data")
    stats: dict[str, Any] = {}
    rows = read_rows(d.train)
    seed = split_seed(d, cfg.train.seed)
    rows, test_rows = test_split(rows, d, seed, d.train, stats)
    val = read_rows(d.validation) if d.validation else None
    rows, val = split(rows, val, d, seed, d.train, stats)
    enc = Encoder(cfg, tok)
    fn = ENCODERS[kind]
    train = fn(rows, enc, d.train)
    ev = fn(val, enc, d.validation or f"{d.train} (validation)")
    test = fn(test_rows, enc, d.test or f"{d.train} (test)") if test_rows else []
    stats["truncated"] = enc.truncated
    if enc.truncated:
        log(f"data: {enc.truncated} completions cut at data.max_length={d.max_length} tokens")
    # prompts + references for generation: GRPO's prompts; the chosen answers of pairs, so a short-answer
    # task also measures generated-answer accuracy (gen_accuracy) as its SFT run does
    raw = [{"prompt_ids": e["prompt_ids"], "reference": e["reference"], "row": i} for i, e in enumerate(ev)] \
        if kind in ("prompts", "pairs") else []
    refs = sorted({r["reference"] for r in raw})
    answers = refs if kind == "pairs" and refs and len(refs) <= 20 and all(len(x.split()) == 1 for x in refs) else None
    test_raw = [{"prompt_ids": e["prompt_ids"], "reference": e["reference"], "row": i} for i, e in enumerate(test)] \
        if kind in ("prompts", "pairs") else []
    return Prepared(format=kind, train=train, eval=ev, eval_raw=raw, test=test, test_raw=test_raw, answers=answers,
                    stats=stats, source=d.train)
