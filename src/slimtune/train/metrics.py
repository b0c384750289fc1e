"""Held-out metrics the trainer reports: accuracy / macro-F1 and generated-answer matching."""
from __future__ import annotations


def accuracy_f1(preds: list[int], golds: list[int], n: int) -> dict[str, float]:
    acc = sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)
    f1s = []
    for c in range(n):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1": sum(f1s) / max(len(f1s), 1)}


def _norm(s: str) -> str:
    return " ".join("".join(ch for ch in s.lower() if ch.isalnum() or ch.isspace()).split())


def answer_matches(pred: str, ref: str, answers: list[str] | None = None) -> bool:
    """Generated text vs reference. With a known answer set (labels), the prediction is the first
    answer word the text contains ("The review is fresh." -> fresh), so a zero-shot model is not
    marked wrong for phrasing; otherwise the first line must equal the reference."""
    p, r = _norm(pred.strip().split("\n")[0]), _norm(ref)
    if answers:
        words = p.split()
        found = [(words.index(a), a) for a in map(_norm, answers) if a in words]
        return bool(found) and min(found)[1] == r
    return bool(r) and (p == r or p.startswith(r + " ") or p == r + "s")
