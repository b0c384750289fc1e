"""slimtune's DPO job against TRL's DPOTrainer + peft, as two real processes on the same data, model,
LoRA and batches (issue 24): whole-process time, step time, peak memory (the child's max RSS) and
both sides' held-out reward accuracy.

Same batches, asserted: TRL reads the pairs in the order slimtune's trainer draws them (its seeded
permutation per epoch, `train_sampling_strategy="sequential"`), both sides train fp32 with AdamW at a
constant lr and clip 1.0. Step 1's chosen / rejected log-probs must agree to 0.1% (the same base on
the same rows; LoRA B starts at 0, so the adapter changes nothing yet); later steps to 5%: the two
libraries draw LoRA A's random start differently, so the trajectories drift apart a little (run 1:
at most 1.9% over 10 steps), while another batch's log-probs differ by far more.

    flock /tmp/slimtune-bench.lock python examples/bench_dpo_vs_trl.py [--steps 10] [--batch 4] [--rows 80]
        [--eval 40] [--threads N] [--save benchmarks/results/dpo-vs-trl-cpu]

Both processes use the same number of CPU threads (--threads, default: every core; slimtune's auto
would pick fewer on a busy machine). The pairs are the ones examples/dpo_plot_review.py writes (run
it first, or this writes them). --save writes the figures as NAME.json and the table as NAME.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from slimtune.bench.job import run_child as run, trainer_order as order

HERE = Path(__file__).resolve().parent
PAIRS = HERE.parent / "runs" / "dpo_plot_review"
TARGETS = ["q_proj", "k_proj", "v_proj"]

TRL_SIDE = r'''
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
t0 = time.time()
import peft, trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
tok = AutoTokenizer.from_pretrained(a["model"])
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
rows = [json.loads(l) for l in open(a["train"])]
ev = [json.loads(l) for l in open(a["eval"])]
conv = lambda r: {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": r["prompt"]}],
                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                  "rejected": [{"role": "assistant", "content": r["rejected"]}]}
train = Dataset.from_list([conv(rows[i]) for i in a["order"]])
args = trl.DPOConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                     per_device_eval_batch_size=a["batch"], learning_rate=a["lr"], lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
                     bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True, save_strategy="no", beta=a["beta"],
                     max_length=a["max_length"], train_sampling_strategy="sequential", optim="adamw_torch")
lora = peft.LoraConfig(r=a["r"], lora_alpha=2 * a["r"], target_modules=a["targets"], lora_dropout=0.0)
tr = trl.DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=Dataset.from_list([conv(r) for r in ev]),
                    processing_class=tok, peft_config=lora)
tr.train()
steps = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
run = next(h for h in tr.state.log_history if "train_runtime" in h)
res = tr.evaluate()
json.dump({"steps": steps, "train_s": run["train_runtime"], "eval": res, "wall_in_s": time.time() - t0},
          open(a["result"], "w"))
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows", type=int, default=80)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--save", default=None, help="write NAME.json and NAME.md (e.g. benchmarks/results/dpo-vs-trl-cpu)")
    a = ap.parse_args()
    if not (PAIRS / "pairs_train.jsonl").is_file():
        subprocess.run([sys.executable, str(HERE / "dpo_plot_review.py"), "train.max_steps=1"], check=True)
    from slimtune.train import models

    model = models.resolve("smollm2-135m", print)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    train_rows = (PAIRS / "pairs_train.jsonl").read_text().splitlines()[:a.rows]
    eval_rows = (PAIRS / "pairs_validation.jsonl").read_text().splitlines()[:a.eval]
    (tmp / "train.jsonl").write_text("\n".join(train_rows) + "\n")
    (tmp / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")
    r, seed, max_len = 16, 42, 128
    ours = [sys.executable, "-m", "slimtune", "train", f"model={model}", f"data.train={tmp / 'train.jsonl'}",
            f"data.validation={tmp / 'eval.jsonl'}", f"data.max_length={max_len}", "data.system_prompt=''",
            "method=lora", f"method.r={r}", f"method.lora_alpha={2 * r}", f"method.target_modules=[{','.join(TARGETS)}]",
            f"method.layers_to_transform=[{','.join(map(str, range(30)))}]", "train.objective=dpo", "train.beta=0.1", "train.precision=fp32",
            f"train.max_steps={a.steps}", f"train.batch_size={a.batch}", f"train.lr={a.lr}", "train.scheduler=constant",
            "train.warmup_steps=0", "train.log_every=1", f"train.eval_every={a.steps}", "train.eval_before=false",
            f"train.seed={seed}", f"eval.batch_size={a.batch}", f"eval.max_examples={a.eval}", "eval.generate=false",
            "eval.samples=0", f"train.cpu_threads={a.threads}", f"output_dir={tmp / 'slimtune'}", "--no-progress"]
    w_ours, m_ours = run(ours, tmp / "slimtune.log")
    spec = dict(model=model, train=str(tmp / "train.jsonl"), eval=str(tmp / "eval.jsonl"), out=str(tmp / "trl"),
                steps=a.steps, batch=a.batch, lr=a.lr, beta=0.1, r=r, targets=TARGETS, max_length=max_len,
                order=order(len(train_rows), a.steps, a.batch, seed), result=str(tmp / "trl.json"), threads=a.threads)
    w_trl, m_trl = run([sys.executable, "-c", TRL_SIDE, json.dumps(spec)], tmp / "trl.log")

    summary = json.loads((tmp / "slimtune" / "summary.json").read_text())
    ms = [json.loads(x) for x in (tmp / "slimtune" / "metrics.jsonl").read_text().splitlines()]
    steps_ours = [x for x in ms if "loss" in x]
    t = json.loads((tmp / "trl.json").read_text())
    assert len(steps_ours) == len(t["steps"]) == a.steps
    drift = 0.0
    for s, (x, y) in enumerate(zip(steps_ours, t["steps"]), 1):  # the same rows: the same log-probs
        for ko, kt in (("train_logps_chosen", "logps/chosen"), ("train_logps_rejected", "logps/rejected")):
            rel = abs(x[ko] - y[kt]) / max(1.0, abs(y[kt]))
            assert rel < (1e-3 if s == 1 else 5e-2), f"step {s}: {ko} {x[ko]} vs TRL {y[kt]}: not the same batch"
            drift = max(drift, rel)
    step_ours = summary["train_time_s"] / summary["steps"]
    step_trl = t["train_s"] / len(t["steps"])
    acc_ours, acc_trl = summary["after"]["reward_accuracy"], t["eval"]["eval_rewards/accuracies"]
    import platform

    import torch

    head = (f"DPO, SmolLM2-135M, LoRA r={r} on {TARGETS} (all 30 blocks), fp32, {a.steps} steps of {a.batch} pairs, "
            f"{a.eval} held-out pairs, {a.threads} CPU thread(s) each; same batches (step 1's log-probs agree, later "
            f"steps within {100 * drift:.1f}%)")
    table = [f"| | slimtune | TRL + peft | TRL / slimtune |", "|---|---|---|---|",
             f"| whole process, s | {w_ours:.1f} | {w_trl:.1f} | {w_trl / w_ours:.2f} |",
             f"| step, s | {step_ours:.2f} | {step_trl:.2f} | {step_trl / step_ours:.2f} |",
             f"| peak memory (max RSS), MiB | {m_ours:.0f} | {m_trl:.0f} | {m_trl / m_ours:.2f} |",
             f"| held-out reward accuracy | {acc_ours:.3f} | {acc_trl:.3f} | |"]
    print("\n" + head)
    print("\n".join(table))
    print(f"(folder {tmp})")
    if a.save:
        cmd = "flock /tmp/slimtune-bench.lock python examples/bench_dpo_vs_trl.py " + " ".join(sys.argv[1:])
        res = {"command": cmd, "setup": head, "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "load_avg_after": os.getloadavg(), "torch": torch.__version__,
               "slimtune": {"process_s": w_ours, "step_s": step_ours, "peak_rss_mib": m_ours, "reward_accuracy": acc_ours,
                            "train_logps_chosen": [x["train_logps_chosen"] for x in steps_ours]},
               "trl": {"process_s": w_trl, "step_s": step_trl, "peak_rss_mib": m_trl, "reward_accuracy": acc_trl,
                       "logps_chosen": [y["logps/chosen"] for y in t["steps"]]},
               "ratios_trl_over_slimtune": {"process": w_trl / w_ours, "step": step_trl / step_ours,
                                            "peak_memory": m_trl / m_ours}}
        Path(a.save + ".json").write_text(json.dumps(res, indent=2))
        Path(a.save + ".md").write_text(f"# {head}\n\n`{cmd}`\n\n" + "\n".join(table)
                                        + f"\n\nload average after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                                        "cores (a shared machine)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
