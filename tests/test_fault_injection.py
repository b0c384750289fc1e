"""Fault injection: a real training process is SIGKILLed again and again, at random moments and
inside checkpoint writes (a torn torch.save, a torn safetensors file, just before / just after a
rename, halfway through deleting a folder), each time resumed with `resume: true`, and the run that
finally completes is bitwise equal to one that was never interrupted.

Processes come from a multiprocessing forkserver that has imported torch, transformers and slimtune
once, so each of the 13 runs starts in a fraction of a second; each is a real process, killed by a
real SIGKILL (from the test, or from itself at the chosen instruction). Steps are slowed by a sleep
so kills land mid-run; the sleep does not touch the numbers.
"""
import json
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest_train import instruction_rows, tiny_llama, write_jsonl  # noqa: F401

N_KILLS = 11  # 10 must land (a late one may find the run done)
POINTS = ["async", "torch.save", "save_file", "replace-before", "replace-after", "rmtree"]
STEP_SLEEP = 0.02
# what a run imports, imported once in the forkserver (imports only: no torch op runs there)
PRELOAD = ["torch", "torch._dynamo", "transformers", "transformers.generation", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
           "transformers.models.bert.tokenization_bert", "datasets", "accelerate", "safetensors.torch",
           "torch.utils.tensorboard", "matplotlib.pyplot", "slimtune.train.run", "conftest_train"]


def _config(model: str, data: str, out: str, resume: bool):
    from conftest_train import job

    return job(Path(model), Path(out), {"train": data, "max_length": 32},
               train={"max_steps": 48, "eval_every": 6, "save_every": 2, "log_every": 1, "lr": 5e-3,
                      "cpu_threads": 1},
               eval={"max_new_tokens": 2, "max_examples": 4, "samples": 2}, resume=resume)


def _arm(point: str, nth: int) -> None:
    """In the child: SIGKILL this process at the nth call of the chosen function."""
    import io
    import shutil

    import safetensors.torch as st

    import slimtune.checkpoint as sck

    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def torn(orig, to_bytes):
        def f(obj, path, *a, **k):
            if hit():  # half the file on disk, then dead
                data = to_bytes(obj, *a, **k)
                with open(path, "wb") as fh:
                    fh.write(data[:len(data) // 2])
                die()
            return orig(obj, path, *a, **k)
        return f

    if point == "torch.save":
        orig = torch.save

        def tb(obj, *a, **k):
            buf = io.BytesIO()
            orig(obj, buf)
            return buf.getvalue()
        torch.save = torn(orig, tb)
    elif point == "save_file":
        orig_sf = st.save_file
        f = torn(orig_sf, lambda t, metadata=None: st.save(t, metadata=metadata))
        st.save_file = f
        sck.save_file = f
    elif point.startswith("replace"):
        orig_rep = os.replace

        def rep(a, b, *x, **k):
            if point == "replace-before" and hit():
                die()
            r = orig_rep(a, b, *x, **k)
            if point == "replace-after" and hit():
                die()
            return r
        os.replace = rep
    elif point == "rmtree":
        orig_rm = shutil.rmtree

        def rm(path, *a, **k):
            if hit():
                files = sorted(Path(path).rglob("*"))
                files = [p for p in files if p.is_file()]
                if files:
                    files[0].unlink()
                die()
            return orig_rm(path, *a, **k)
        shutil.rmtree = rm


def _train(model: str, data: str, out: str, resume: bool, point: str | None, nth: int) -> None:
    """The child process: one `run_train`, maybe armed to kill itself."""
    from slimtune.train import trainer as T
    from slimtune.train.run import run_train

    orig = T.Trainer._batch

    def slow(self, m):
        time.sleep(STEP_SLEEP)
        return orig(self, m)
    T.Trainer._batch = slow
    if point and point != "async":
        _arm(point, nth)
    run_train(_config(model, data, out, resume), log=lambda *_: None, progress=False)


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=-1)


def _last_ckpt(out: Path) -> int:
    cks = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return int(cks[-1].name.split("-")[1]) if cks else 0


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _curve(out: Path) -> list:
    keep = ("step", "loss", "lr", "grad_norm", "eval_loss", "perplexity", "gen_accuracy", "choice_accuracy")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise(tiny_llama, tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    data = str(write_jsonl(tmp_path / "d.jsonl", instruction_rows(40)))
    model = str(tiny_llama)

    def spawn(out, resume, point=None, nth=1):
        p = ctx.Process(target=_train, args=(model, data, str(out), resume, point, nth))
        p.start()
        return p

    ref = spawn(tmp_path / "ref", False)
    ref.join(120)
    assert ref.exitcode == 0

    out = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("SLIMTUNE_FAULT_SEED", 1234)))  # another seed: other kill points
    plans = POINTS * (N_KILLS // len(POINTS)) + rng.sample(POINTS, N_KILLS % len(POINTS))
    rng.shuffle(plans)
    landed: list[str] = []
    for point in plans:
        nth = rng.randint(1, 4)
        p = spawn(out, True, point, nth)
        if point == "async":  # kill from outside, a few steps past the last checkpoint
            target = _last_ckpt(out) + rng.randint(1, 4)
            deadline = time.time() + 60
            while p.is_alive() and _logged_step(out) < target and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, STEP_SLEEP))
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        if p.is_alive():  # hung: end it and fail
            p.kill()
            pytest.fail(f"{point}#{nth}: still running after 60 s")
        assert p.exitcode in (0, -signal.SIGKILL), f"{point}#{nth}: exit code {p.exitcode}"
        if p.exitcode == -signal.SIGKILL:
            landed.append(f"{point}#{nth}@{_last_ckpt(out)}")
    final = spawn(out, True)
    final.join(120)
    assert final.exitcode == 0
    assert len(landed) >= 10, landed  # every plan but a late one lands

    for rel in ("checkpoints/step-000048/trainable.safetensors", "adapter/adapter_model.safetensors",
                "best/adapter_model.safetensors"):
        a, b = _tensors(tmp_path / "ref" / rel), _tensors(out / rel)
        assert a.keys() == b.keys(), rel
        for k in a:
            assert torch.equal(a[k], b[k]), (rel, k)
    assert json.loads((out / "best/best.json").read_text()) == json.loads((tmp_path / "ref/best/best.json").read_text())
    assert _curve(out) == _curve(tmp_path / "ref")  # the same losses, lrs and evals, bit for bit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["sessions"]) >= 2
    assert not list(out.glob(".tmp*")) and not list((out / "checkpoints").glob(".tmp*"))
    assert not (out / ".slimtune.lock").exists()
