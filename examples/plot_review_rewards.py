"""A verifiable reward for examples/grpo_plot_review.yaml, given as `module:function` in YAML.

SmolLM2-Instruct answers the default task in a sentence ("This text is a movie's plot summary, ...")
rather than with the bare label, so `exact_match` (the first word) scores 0 for every sampled
completion at the start, and GRPO's group-normalised advantages are then all 0: nothing to learn.
`first_label` checks the label the completion names first against the row's `answer` column.
"""
from __future__ import annotations

import re

LABELS = ("plot", "review")


def first_label(prompts, completions, answer, **columns) -> list[float]:
    """1.0 when the first of the words plot / review in the completion is the row's answer."""
    out = []
    for c, a in zip(completions, answer):
        m = re.search(r"\b(plot|review)", str(c).lower())
        out.append(float(m is not None and m.group(1) == str(a).strip().lower()))
    return out
