"""SFT: next-token loss on the answer tokens (or a classifier's cross-entropy): the job's own
pipeline (data.py, lm.py, evaluate.py) runs it, so this entry only names it in the registry."""
from __future__ import annotations

from .base import Objective


class SFT(Objective):
    name = "sft"
    data = "sft"  # the pipeline's own formats (docs/data.md)
    pipeline = True
