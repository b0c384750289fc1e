"""Training objectives: a registry, one module each. The pipeline asks the objective for its data,
batches, loss and held-out metrics; it never branches on the objective's name.

    sft    the job's next-token / classification loss (data.py, lm.py)
    dpo    preference pairs against the adapter-off reference          (dpo.py)
    ipo    DPO with IPO's squared loss                                  (dpo.py)
    orpo   SFT + odds ratio, no reference                               (orpo.py)
    simpo  length-averaged log-prob margin, no reference                (simpo.py)
    kto    unpaired desirable / undesirable rows, KL-anchored reference (kto.py)
    grpo   sampled groups, reward functions, group-normalised advantages (grpo.py)
"""
from __future__ import annotations

from ..config import TrainConfig
from .base import Objective
from .dpo import DPO, IPO
from .grpo import GRPO
from .kto import KTO
from .orpo import ORPO
from .simpo import SimPO
from .sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (SFT, DPO, IPO, ORPO, SimPO, KTO, GRPO)}


def build(t: TrainConfig) -> Objective | None:
    """The objective of a train config; None for sft (the pipeline's own loss)."""
    cls = OBJECTIVES[t.objective]
    if getattr(cls, "pipeline", False):
        return None
    if t.precompute_ref and cls.data != "pairs":
        from ..config import JobConfigError

        raise JobConfigError(f"train.precompute_ref applies to dpo / ipo (a fixed reference per pair); "
                             f"{t.objective} computes its reference per batch: remove precompute_ref")
    if t.loss_type is not None and cls not in (DPO, IPO):
        from ..config import JobConfigError

        raise JobConfigError(f"train.loss_type={t.loss_type} is DPO's (sigmoid / hinge / ipo); {t.objective} has one "
                             "loss: remove loss_type")
    if t.sft_weight and cls not in (DPO, IPO):
        from ..config import JobConfigError

        raise JobConfigError(f"train.sft_weight adds the chosen answers' NLL to DPO / IPO; {t.objective} "
                             + ("has its own (beta weighs its odds-ratio term)" if cls is ORPO else "has none")
                             + ": remove sft_weight")
    return cls(t)


__all__ = ["OBJECTIVES", "Objective", "build"]
