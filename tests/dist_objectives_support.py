"""The configs and the per-rank worker of tests/test_distributed_objectives.py: every objective of
issue 24 on a tiny Llama, one process with the global batch (in the test process) and two torchrun
processes with half of it each (this script, every objective in one process group).

    python -m torch.distributed.run ... tests/dist_objectives_support.py OUT MODEL DATA_DIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# answers of different token lengths, so the ranks hold different numbers of completion tokens and a
# token mean (ORPO, RPO's NLL) is wrong unless it is the global batch's
QS = [("capital of france", "paris", "the city of london in england"), ("two plus two", "four is the sum", "five"),
      ("color of the sky", "blue", "green like grass in the spring"), ("opposite of hot", "cold and icy", "warm")]

# run -> (data file, extra train keys); the run's name up to "-" is its objective. dpo: the one-row
# fast layout (the decoder and head beside the DDP wrapper, gradients all-reduced by hand) with RPO's
# NLL; ipo, kto-padded: the padded layout through the wrapper's forward (chunked_ce off); kto: 2 rows
# per rank, so each rank's first KL row takes the previous rank's completion
OBJECTIVES: dict[str, tuple[str, dict]] = {
    "dpo": ("pairs", {"sft_weight": 0.5}),
    "ipo": ("pairs", {"chunked_ce": "off"}),
    "orpo": ("pairs", {}),
    "simpo": ("conversational", {}),
    "kto": ("unpaired", {}),
    "kto-padded": ("unpaired", {"chunked_ce": "off"}),
    "grpo": ("prompts", {"num_generations": 2, "max_completion_length": 4, "beta": 0.04,
                         "rewards": ["exact_match", {"name": "length", "target": 2}]}),
}


def rows(kind: str, n: int = 16) -> list[dict]:
    qs = (QS * n)[:n]
    if kind == "pairs":
        return [{"prompt": f"what is the {q}?", "chosen": a, "rejected": b} for q, a, b in qs]
    if kind == "conversational":
        return [{"chosen": [{"role": "user", "content": f"what is the {q}?"}, {"role": "assistant", "content": a}],
                 "rejected": [{"role": "user", "content": f"what is the {q}?"}, {"role": "assistant", "content": b}]}
                for q, a, b in qs]
    if kind == "unpaired":
        return [{"prompt": f"what is the {q}?", "completion": a if i % 3 else b, "label": bool(i % 3)}
                for i, (q, a, b) in enumerate(qs)]
    return [{"prompt": f"what is the {q}?", "answer": a.split()[0]} for q, a, _ in qs]


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("pairs", "conversational", "unpaired", "prompts"):
        (folder / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(kind)))


def config(model: Path, data_dir: Path, out: Path, objective: str, batch_size: int, **train):
    """3 steps of global batch 4, fp32 pinned (the ranks' sums in another order stay within 1e-5),
    an evaluation at the end (every rank evaluates the same 4 held-out rows)."""
    from conftest_train import job

    kind, extra = OBJECTIVES[objective]
    t = {"objective": objective.split("-")[0], "max_steps": 3, "batch_size": batch_size, "eval_every": 3, "eval_before": False,
         "lr": 1e-2, "precision": "fp32", "distributed_timeout": 60, **extra, **train}
    return job(model, out, {"train": str(data_dir / f"{kind}.jsonl"), "max_length": 48, "val_fraction": 0.25},
               method={"name": "lora", "r": 4, "lora_dropout": 0.0}, train=t,
               eval={"max_examples": 4, "batch_size": 4, "samples": 0, "generate": False})


def main(out: str, model: str, data_dir: str, mode: str = "ddp", names: str = "") -> None:
    """Every objective under `mode` (2 processes x batch 2); what each run did, keyed by objective
    (its error's message where it stopped), in OUT/results.json (rank 0)."""
    from slimtune.train.run import run_train

    logs: dict[str, list[str]] = {}
    results = {}
    for name in names.split(",") if names else OBJECTIVES:
        logs[name] = []
        cfg = config(Path(model), Path(data_dir), Path(out) / name, name, 2, distributed=mode)
        try:
            res = run_train(cfg, log=logs[name].append, progress=False)
            results[name] = {"ok": True, "world": res["world_size"], "log": logs[name]}
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:800], "log": logs[name]}
    if os.environ.get("RANK", "0") == "0":
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(*sys.argv[1:])
