"""`slimtune train` with train.objective: each objective trains from one config on TRL-format rows
(a tiny random-init Llama, fp32 pinned), logs its reward statistics, and every bad row or reward
function is one message from the CLI, exit 2 (issue 24)."""
import json
import sys

import pytest

from conftest_train import tiny_llama, write_jsonl  # noqa: F401
from slimtune.cli.main import main

QS = [("capital of france", "paris", "london"), ("two plus two", "four", "five"), ("color of the sky", "blue", "green"),
      ("opposite of hot", "cold", "warm")]


def pairs(n=40):
    return [{"prompt": f"what is the {q}?", "chosen": a, "rejected": b} for q, a, b in (QS * n)[:n]]


def conversational(n=40):
    return [{"chosen": [{"role": "user", "content": f"what is the {q}?"}, {"role": "assistant", "content": a}],
             "rejected": [{"role": "user", "content": f"what is the {q}?"}, {"role": "assistant", "content": b}]}
            for q, a, b in (QS * n)[:n]]


def unpaired(n=40):
    return [{"prompt": f"what is the {q}?", "completion": a if i % 2 else b, "label": bool(i % 2)}
            for i, (q, a, b) in enumerate((QS * n)[:n])]


def prompts(n=24):
    return [{"prompt": f"what is the {q}?", "answer": a} for q, a, _ in (QS * n)[:n]]


def args(model, data, out, objective, *extra):
    return ["train", f"model={model}", f"data.train={data}", f"output_dir={out}", f"train.objective={objective}",
            "train.precision=fp32", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2", "train.eval_every=2",
            "train.log_every=1", "train.cpu_threads=1", "eval.max_examples=8", "eval.batch_size=8", "data.max_length=48",
            "--no-progress", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective,rows", [("dpo", pairs), ("ipo", pairs), ("orpo", pairs), ("simpo", conversational),
                                            ("kto", unpaired)])
def test_preference_objective_trains_from_one_config(tmp_path, tiny_llama, objective, rows):
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    out = tmp_path / "run"
    assert main(args(tiny_llama, data, out, objective)) == 0
    m = metrics(out)
    steps = [r for r in m if "loss" in r]
    evals = [r for r in m if "reward_accuracy" in r]
    assert len(steps) == 4 and all("train_reward_margin" in r and "train_reward_accuracy" in r for r in steps)
    assert [r["step"] for r in evals] == [0, 2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "reward_accuracy"
    # the held-out margin grows: the adapter moves the chosen answers above the rejected ones
    assert evals[-1]["reward_margin"] > evals[0]["reward_margin"]
    assert (out / "best" / "adapter_model.safetensors").is_file()
    # the report: margins and accuracy at each evaluation, training and held out (the plot has the same panel)
    report = (out / "report.md").read_text()
    table = report.split("## Reward margin and accuracy over steps")[1].split("\n## ")[0]
    assert "| step | train reward_margin | train reward_accuracy | held-out reward_margin |" in table
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "step" not in line] \
        == ["0", "2", "4"]
    assert f"| 4 | {steps[-1]['train_reward_margin']:.4f} |" in table
    from slimtune.train.report import _objective_series

    pref = _objective_series(m)
    assert pref["title"] == "reward margin and accuracy" and len(pref["series"]["held-out reward_accuracy"]) == 3
    assert (out / "plot.png").stat().st_size > 0
    if objective != "kto":  # one-word chosen answers: generated-answer accuracy is measured too, as for SFT
        assert all(0.0 <= r["gen_accuracy"] <= 1.0 for r in evals)


def test_dpo_precompute_ref_equals_adapter_off_reference_on_a_fresh_adapter(tmp_path, tiny_llama):
    """A fresh LoRA (B = 0) is the base model: precomputed reference log-probs give the same run."""
    data = write_jsonl(tmp_path / "d.jsonl", pairs())
    assert main(args(tiny_llama, data, tmp_path / "a", "dpo")) == 0
    assert main(args(tiny_llama, data, tmp_path / "b", "dpo", "train.precompute_ref=true")) == 0
    assert (tmp_path / "b" / "ref_logps.json").is_file()
    la = [r["loss"] for r in metrics(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in metrics(tmp_path / "b") if "loss" in r]
    assert la == pytest.approx(lb, abs=1e-5)


def test_grpo_trains_with_builtin_and_user_rewards(tmp_path, tiny_llama, monkeypatch):
    """GRPO: groups sampled with the adapter, a built-in reward and the user's module:function; the
    user's reward (fewer characters are better: short word pieces, or EOS) is learnt within a few steps."""
    (tmp_path / "myrewards.py").write_text(
        "def short(prompts, completions, answer, **kw):\n"
        "    assert len(answer) == len(completions)\n"
        "    return [-len(c) / 40 for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", prompts())
    out = tmp_path / "run"
    rc = main(args(tiny_llama, data, out, "grpo", "train.rewards=[exact_match, 'myrewards:short']",
                   "train.reward_weights=[1.0, 1.0]", "train.max_completion_length=8", "train.num_generations=4",
                   "train.max_steps=6", "train.lr=5e-2", "train.eval_every=6", "train.beta=0.04"))
    assert rc == 0
    m = metrics(out)
    steps = [r for r in m if "loss" in r]
    assert all({"train_reward", "train_reward_exact_match", "train_reward_myrewards:short", "train_kl",
                "train_completion_length"} <= set(r) for r in steps)
    evals = [r for r in m if "reward" in r and "loss" not in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6
    assert evals[-1]["reward"] > evals[0]["reward"]  # held-out reward (greedy completions) improves
    assert "## Mean reward and KL over steps" in (out / "report.md").read_text()
    assert "myrewards" in sys.modules


BAD = [
    ("chosen equals rejected", "dpo", [{"prompt": "a b", "chosen": "yes", "rejected": "yes"}] * 4,
     "row 0: chosen and rejected are the same ('yes')"),
    ("rejected missing", "dpo", [{"prompt": "a b", "chosen": "yes"}] * 4, "no 'rejected'; a preference row needs"),
    ("prompt too long", "dpo", [{"prompt": "word " * 80, "chosen": "yes", "rejected": "no"}] * 4,
     "the prompt is 8"),
    ("kto completion missing", "kto", [{"prompt": "a", "label": True}] * 4,
     "row 0: no 'completion'; an unpaired (KTO) row needs prompt, completion and label"),
    ("grpo prompt missing", "grpo", [{"answer": "paris"}] * 4, "row 0: no 'prompt'; a GRPO row needs a prompt"),
    ("grpo prompt too long", "grpo", [{"prompt": "word " * 80, "answer": "yes"}] * 4, "the prompt is 8"),
    ("sft_weight on simpo", "simpo", pairs(8), "train.sft_weight adds the chosen answers' NLL to DPO / IPO"),
    ("kto label not boolean", "kto", [{"prompt": "a", "completion": "b", "label": "maybe"}] * 4,
     "label 'maybe' is not true / false"),
    ("kto one label", "kto", [{"prompt": "a", "completion": "b", "label": True}] * 4,
     "KTO needs desirable (true) and undesirable (false)"),
    ("grpo reward not importable", "grpo", prompts(8), "module 'nosuchmod' cannot be imported"),
    ("grpo reward raises", "grpo", prompts(8), "reward 'badrewards:boom' raised ZeroDivisionError"),
    ("grpo reward not a number", "grpo", prompts(8), "reward 'badrewards:text' returned 'x', not a finite number"),
    ("loss_type on orpo", "orpo", pairs(8), "train.loss_type=hinge is DPO's"),
]
EXTRA = {"grpo reward not importable": ["train.rewards=['nosuchmod:f']"],
         "grpo reward raises": ["train.rewards=['badrewards:boom']"],
         "grpo reward not a number": ["train.rewards=['badrewards:text']"],
         "loss_type on orpo": ["train.loss_type=hinge"], "sft_weight on simpo": ["train.sft_weight=1.0"]}


@pytest.mark.parametrize("name,objective,rows,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_message(tmp_path, tiny_llama, capsys, monkeypatch, name, objective, rows, expect):
    (tmp_path / "badrewards.py").write_text("def boom(prompts, completions, **kw):\n    return 1 / 0\n"
                                            "def text(prompts, completions, **kw):\n    return ['x'] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    capsys.readouterr()
    rc = main(args(tiny_llama, data, tmp_path / "run", objective, *EXTRA.get(name, [])))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err, err
    assert "Traceback" not in err


def test_dpo_on_a_quantized_base(tmp_path, tiny_llama):
    """QLoRA + DPO: the nf4 base with its adapters disabled is the reference (no second copy)."""
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "d.jsonl", pairs())
    out = tmp_path / "run"
    assert main(args(tiny_llama, data, out, "dpo", "model.quantize=nf4")) == 0
    evals = [r for r in metrics(out) if "reward_accuracy" in r]
    assert evals[0]["reward_margin"] == 0.0 and evals[-1]["reward_margin"] > 0.0
    assert "nf4" in json.loads((out / "summary.json").read_text())["quantization"]


def test_compare_accepts_a_preference_objective(tmp_path, tiny_llama, capsys):
    """`slimtune compare` on DPO pairs: the objective's metric (held-out reward accuracy) is the
    comparison's, and the test split is measured with it."""
    import csv

    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", pairs(60))
    cfg = {"model": str(tiny_llama), "method": "lora", "data": {"train": str(data), "max_length": 48,
                                                                  "test_fraction": 0.2},
           "train": {"objective": "dpo", "precision": "fp32", "max_steps": 4, "batch_size": 4, "lr": 1e-2,
                     "eval_every": 2, "cpu_threads": 1}, "eval": {"batch_size": 8, "samples": 0},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    rc = main(["compare", str(tmp_path / "cfg.yaml"), "--methods", "lora", "--steps", "4", "--lr", "lora=1e-2",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads((out / "runs" / "lora" / "result.json").read_text())
    assert res["test"]["n_test"] == 12 and 0.0 <= res["test"]["reward_accuracy"] <= 1.0
    rows = {r["name"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert float(rows["lora"]["test_metric"]) == res["test"]["reward_accuracy"]


def test_a_reward_that_raises_mid_run_keeps_a_checkpoint_and_resumes(tmp_path, tiny_llama, capsys, monkeypatch):
    """The user's reward breaks at step 3: a checkpoint of step 2 is written, the message names the
    function and the resume command; after the fix, --resume finishes the run from there."""
    (tmp_path / "flaky.py").write_text(
        "import os\n"
        "calls = 0\n"
        "def reward(prompts, completions, **kw):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls == 3 and os.environ.get('FLAKY'):\n"
        "        raise RuntimeError('service down')\n"
        "    return [float(len(c) % 3) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLAKY", "1")
    data = write_jsonl(tmp_path / "d.jsonl", prompts())
    out = tmp_path / "run"
    argv = args(tiny_llama, data, out, "grpo", "train.rewards=['flaky:reward']", "train.max_completion_length=4",
                "train.eval_before=false", "train.save_every=100", "train.eval_every=4")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "reward 'flaky:reward' raised RuntimeError: service down" in err and "--resume" in err, err
    assert (out / "checkpoints" / "step-000002").is_dir()
    monkeypatch.delenv("FLAKY")
    assert main(argv + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("objective,rows,metric", [("dpo", pairs, "reward_accuracy"), ("grpo", prompts, "reward")])
def test_search_accepts_a_preference_or_reward_objective(tmp_path, tiny_llama, objective, rows, metric):
    """`slimtune search` on DPO pairs / GRPO prompts: the trials optimise the objective's held-out
    metric (reward accuracy, mean reward), and the test split is measured with it."""
    pytest.importorskip("optuna")
    import yaml

    from slimtune.search.study import SearchOptions, run_search
    from slimtune.train.config import load_config

    data = write_jsonl(tmp_path / "d.jsonl", rows(60 if objective == "dpo" else 30))
    cfg = {"model": str(tiny_llama), "method": "lora", "data": {"train": str(data), "max_length": 48, "test_fraction": 0.2},
           "train": {"objective": objective, "precision": "fp32", "max_steps": 4, "batch_size": 4, "lr": 1e-2,
                     "eval_every": 2, "cpu_threads": 1, "max_completion_length": 4},
           "eval": {"batch_size": 8, "max_examples": 8, "samples": 0}, "output_dir": str(tmp_path / "run"),
           "search": {"methods": ["lora"], "r": [2, 4], "targets": ["attention"], "layers": ["all"], "dropout": 0.0,
                      "lr": {"low": 5e-3, "high": 2e-2, "log": True}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    s = run_search(load_config(str(tmp_path / "cfg.yaml")), SearchOptions(out=tmp_path / "search", trials=2),
                   log=lambda m: None)
    assert s["pf"].metric == metric and s["pf"].metric_max
    done = [t for t in s["study"].trials if t.state.name == "COMPLETE"]
    assert done and s["best"] is not None
    best = s["best"]
    assert best.user_attrs["result"]["metric"] == metric
    assert best.value == pytest.approx(best.user_attrs["result"]["best"])
    test = s["tests"][str(best.number)]
    assert 0.0 <= test[metric] <= 1.0 and test["n_test"] > 0
