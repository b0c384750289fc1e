"""Helpers for the multi-process tests (tests/test_distributed.py): launch torchrun on loopback with a
bounded time, and a worker script run by each rank for the cases one `slimtune train` command
cannot express (every method in one process group; a fault injected into rank 0's save).

    python -m torch.distributed.run ... tests/dist_support.py methods OUT MODEL BERT DATA CLS_DATA MODE [fp32,bf16]
    python -m torch.distributed.run ... tests/dist_support.py crash-in-save CONFIG
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# one small config per registered method (tiny Llama causal LM; bitfit: the tiny BERT classifier,
# whose linears have biases)
METHODS: dict[str, dict] = {
    "lora": {"name": "lora", "r": 2, "lora_dropout": 0.0},
    "dora": {"name": "dora", "r": 2},
    "ia3": {"name": "ia3"},
    "bottleneck": {"name": "bottleneck"},
    "full": {"name": "full"},
    "heads": {"name": "heads", "top_k": 1},
    "layerwise": {"name": "layerwise", "layers": [1]},
    "prefix": {"name": "prefix"},
    "prompt": {"name": "prompt"},
    "p_tuning": {"name": "p_tuning"},
    "singular": {"name": "singular"},
    "sparse": {"name": "sparse", "density": 0.05},
    "bitfit": {"name": "bitfit"},
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "total_step": 2},
    "loha": {"name": "loha", "r": 2}, "lokr": {"name": "lokr", "r": 2}, "vera": {"name": "vera", "r": 16},
    "oft": {"name": "oft", "oft_block_size": 8},
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_CBWR="AUTO,STRICT", TOKENIZERS_PARALLELISM="false")
    e.pop("PYTEST_XDIST_WORKER", None)
    return e


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240, module: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N [-m] ARGS` on 127.0.0.1 and a free port; killed past `timeout`."""
    from slimtune.train.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + (["-m"] if module else []) + args
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def train_cmd(config: Path, *extra: str) -> list[str]:
    return ["slimtune", "train", str(config), "--no-progress", *extra]


def write_config(cfg, path: Path) -> Path:
    import yaml

    from slimtune.train.config import saved_form

    path.write_text(yaml.safe_dump(saved_form(cfg), sort_keys=False))
    return path


# ---- worker modes (run by every rank) -------------------------------------------------------------

def _methods(out: str, llama: str, bert: str, data: str, cls_data: str, mode: str, precisions: str = "fp32") -> None:
    """Every method in every precision of `precisions` (comma-separated), results keyed "method/precision"."""
    from conftest_train import job

    from slimtune.train.run import run_train

    from accelerate.state import AcceleratorState

    results = {}
    for precision in precisions.split(","):
        # accelerate keeps one mixed-precision setting per process (a job is one process's life); the
        # next precision needs a fresh AcceleratorState, over the same process group
        AcceleratorState._reset_state(reset_partial_state=False)
        for name, method in METHODS.items():
            model, d = (bert, cls_data) if name == "bitfit" else (llama, data)
            cfg = job(Path(model), Path(out) / precision / name, {"train": d, "max_length": 32}, method=method,
                      train={"max_steps": 2, "batch_size": 2, "eval_every": 2, "distributed": mode, "score_batches": 1,
                             "eval_before": False, "precision": precision},
                      eval={"generate": False, "samples": 0, "batch_size": 4})
            try:
                res = run_train(cfg, log=lambda m: None, progress=False)
                results[f"{name}/{precision}"] = {"ok": True, "after": res["after"], "world": res["world_size"]}
            except Exception as e:  # noqa: BLE001 - recorded for the test to judge
                results[f"{name}/{precision}"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
    if os.environ.get("RANK", "0") == "0":
        (Path(out) / "methods.json").write_text(json.dumps(results, indent=1, default=str))


def _crash_in_save(config: str) -> None:
    """Rank 0 dies (os._exit) half-way through writing its second checkpoint: after the adapter and
    the trained tensors, before trainer_state.pt."""
    import safetensors.torch as st

    from slimtune.cli.main import main

    calls = {"n": 0}
    real = st.save_file

    def save_file(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        if str(path).endswith("trainable.safetensors"):  # state.py's checkpoint write
            calls["n"] += 1
            if calls["n"] == 2 and os.environ.get("RANK") == "0":
                os._exit(17)

    st.save_file = save_file
    sys.exit(main(["train", config, "--no-progress"]))


def mha_model():
    """A tiny model around nn.MultiheadAttention with LoRA on it (random A and B, so it acts)."""
    import torch
    import torch.nn as nn

    import slimtune

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(50, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            h = self.emb(x)
            return self.head(self.attn(h, h, h)[0])

    pm = slimtune.get_peft_model(Tiny(), slimtune.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"],
                                                            init_lora_weights=False))
    return pm


def mha_steps(model, x, steps: int = 2) -> list:
    """Outputs before and after each of `steps` SGD steps on a fixed loss (the same in every process)."""
    import torch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    outs = []
    for _ in range(steps):
        y = model(x)
        outs.append(y.detach().clone())
        y.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        outs.append(model(x).clone())
    return outs


def _mha_fsdp(out: str) -> None:
    """Every rank: the LoRA-on-MultiheadAttention model inside FSDP(use_orig_params=True) (gloo, CPU),
    the same input on each rank; rank 0 saves its outputs for the test to compare with one process."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo")
    model = FSDP(mha_model(), use_orig_params=True, device_id=torch.device("cpu"))
    torch.manual_seed(1)
    x = torch.randint(0, 50, (3, 5))
    outs = mha_steps(model, x)
    if dist.get_rank() == 0:
        torch.save(outs, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "mha-fsdp":
        _mha_fsdp(*rest)
    elif what == "methods":
        _methods(*rest)
    elif what == "crash-in-save":
        _crash_in_save(*rest)
    else:
        raise SystemExit(f"unknown mode {what}")
