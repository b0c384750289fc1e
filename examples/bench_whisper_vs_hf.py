"""slimtune's speech job (examples/whisper_digits.yaml) against a hand-written Hugging Face
`Seq2SeqTrainer` + peft script, as two real processes on the same clips, model, LoRA and batches
(issue 23): whole-process time, step time, peak memory (the child's max RSS) and both sides' held-out
WER / exact match after training.

Same work on both sides: Whisper-base (the packaged builtin, converted once), LoRA r=8 / alpha 16 on
q_proj + v_proj, fp32, AdamW at a constant lr, clip 1.0, the same 2 s audio window (the HF script
slices the encoder's positional embeddings and the feature extractor's chunk by hand), the same
labels (<|en|><|transcribe|><|notimestamps|> + text + <|endoftext|>), the rows in the order
slimtune's trainer draws them (its seeded permutation per epoch; `train_sampling_strategy=
"sequential"` on the HF side), and one greedy held-out evaluation at the end. Both use 2 threads.
The first step's loss is compared: the same model on the same rows gives the same loss.

    flock /tmp/slimtune-bench.lock python examples/bench_whisper_vs_hf.py [--steps 10] [--batch 8]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

from slimtune.bench.job import run_child as run, trainer_order as order

HERE = Path(__file__).resolve().parent
DIGITS = HERE / "data" / "spoken_digits"

HF_SIDE = r'''
import json, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.time()
import torch
torch.set_num_threads(2)
import csv, jiwer, numpy as np, peft, re, soundfile as sf
from datasets import Dataset
from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, WhisperForConditionalGeneration,
                          WhisperProcessor)
a = json.loads(sys.argv[1])
proc = WhisperProcessor.from_pretrained(a["model"])
model = WhisperForConditionalGeneration.from_pretrained(a["model"], dtype=torch.float32)
# the 2 s window, by hand: the feature extractor's chunk and the encoder's first 100 positions
fe, enc, secs = proc.feature_extractor, model.model.encoder, a["window"]
fe.chunk_length, fe.n_samples = secs, secs * fe.sampling_rate
fe.nb_max_frames = fe.n_samples // fe.hop_length
n = secs * 50
pos = enc.embed_positions.weight.data[:n].clone()
enc.embed_positions = torch.nn.Embedding(n, pos.shape[1])
enc.embed_positions.weight.data.copy_(pos)
enc.embed_positions.requires_grad_(False)
enc.max_source_positions = model.config.max_source_positions = n
tok = proc.tokenizer
tok.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
prefix = list(tok.prefix_tokens)

def rows(path):
    root = path.rsplit("/", 1)[0]
    out = []
    for r in csv.DictReader(open(path)):
        wave = sf.read(f"{root}/{r['audio']}", dtype="float32")[0]
        feats = fe(wave, sampling_rate=16000, return_tensors="np").input_features[0]
        ids = prefix + tok(r["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append({"input_features": feats, "labels": ids[1:], "text": r["text"]})
    return out

train, held = rows(a["train"]), rows(a["eval"])
train = Dataset.from_list([train[i] for i in a["order"]])

def collate(ex):
    n = max(len(e["labels"]) for e in ex)
    lab = torch.full((len(ex), n), -100, dtype=torch.long)
    for j, e in enumerate(ex):
        lab[j, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_features": torch.tensor(np.stack([e["input_features"] for e in ex]), dtype=torch.float32),
            "labels": lab}

model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0))
args = Seq2SeqTrainingArguments(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                                learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                                max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                                dataloader_num_workers=0, disable_tqdm=True, save_strategy="no",
                                train_sampling_strategy="sequential", optim="adamw_torch", remove_unused_columns=False,
                                label_names=["labels"])
tr = Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=collate)
tr.train()
steps = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
run = next(h for h in tr.state.log_history if "train_runtime" in h)
# held-out: greedy transcripts from the same prompt, WER / exact match of the normalised text
model.eval()
hyps = []
with torch.no_grad():
    for i in range(0, len(held), a["eval_batch"]):
        chunk = held[i:i + a["eval_batch"]]
        feats = torch.tensor(np.stack([e["input_features"] for e in chunk]), dtype=torch.float32)
        ids = model.generate(input_features=feats, language="en", task="transcribe", max_new_tokens=8, do_sample=False)
        hyps += tok.batch_decode(ids, skip_special_tokens=True)
norm = lambda s: " ".join(re.sub(r"[^\w\s']", " ", s.lower()).split())
h, r = [norm(x) for x in hyps], [norm(e["text"]) for e in held]
json.dump({"steps": steps, "train_s": run["train_runtime"], "wer": jiwer.wer(r, h),
           "exact_match": sum(x == y for x, y in zip(h, r)) / len(r), "hyps": hyps[:10],
           "wall_in_s": time.time() - t0}, open(a["result"], "w"))
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--out", help="write the result as JSON here too")
    a = ap.parse_args()
    from slimtune.train import models

    model = models.resolve("whisper-base", print)  # converted once, before either side is timed
    tmp = Path(tempfile.mkdtemp(prefix="bench-whisper-"))
    n_train = sum(1 for _ in csv.DictReader(open(DIGITS / "train.csv")))
    seed, eval_batch = 42, 10
    ours = [sys.executable, "-m", "slimtune", "train", str(HERE / "whisper_digits.yaml"), f"output_dir={tmp / 'slimtune'}",
            f"data.audio_window_s={a.window}", f"train.max_steps={a.steps}", f"train.batch_size={a.batch}",
            f"train.lr={a.lr}", "train.scheduler=constant", "train.warmup_steps=0", "train.log_every=1",
            f"train.eval_every={a.steps}", "train.eval_before=false", f"train.seed={seed}", "train.cpu_threads=2",
            "method.lora_dropout=0.0", f"eval.batch_size={eval_batch}", "eval.max_new_tokens=8", "--no-progress"]
    w_ours, m_ours = run(ours, tmp / "slimtune.log")
    spec = dict(model=model, train=str(DIGITS / "train.csv"), eval=str(DIGITS / "heldout.csv"), out=str(tmp / "hf"),
                steps=a.steps, batch=a.batch, lr=a.lr, window=a.window, eval_batch=eval_batch,
                order=order(n_train, a.steps, a.batch, seed), result=str(tmp / "hf.json"))
    w_hf, m_hf = run([sys.executable, "-c", HF_SIDE, json.dumps(spec)], tmp / "hf.log")

    summary = json.loads((tmp / "slimtune" / "summary.json").read_text())
    ms = [json.loads(x) for x in (tmp / "slimtune" / "metrics.jsonl").read_text().splitlines()]
    loss_ours = [x["loss"] for x in ms if "loss" in x]
    hf = json.loads((tmp / "hf.json").read_text())
    loss_hf = [x["loss"] for x in hf["steps"]]
    # the same rows and math give the same first loss (LoRA's B starts at zero; later steps differ by the
    # random init of A, which each side seeds its own way)
    assert abs(loss_ours[0] - loss_hf[0]) < 1e-3 * max(1.0, loss_hf[0]), \
        f"step 1: slimtune loss {loss_ours[0]} vs HF {loss_hf[0]}: not the same batch"
    step_ours = summary["train_time_s"] / summary["steps"]
    step_hf = hf["train_s"] / len(hf["steps"])
    res = {"steps": a.steps, "batch": a.batch, "window_s": a.window, "process_s": [w_ours, w_hf],
           "step_s": [step_ours, step_hf], "peak_mib": [m_ours, m_hf],
           "wer": [summary["after"]["wer"], hf["wer"]], "exact_match": [summary["after"]["exact_match"], hf["exact_match"]],
           "first_losses": [loss_ours[:3], loss_hf[:3]], "folder": str(tmp)}
    print(f"\nWhisper-base + LoRA r=8 on q_proj/v_proj, fp32, 2 threads, {a.steps} steps of {a.batch} clips, "
          f"{a.window} s window, 30 held-out clips; same batches (first losses {loss_ours[0]:.4f} / {loss_hf[0]:.4f})")
    print(f"{'':12s} {'slimtune':>10s} {'HF+peft':>10s} {'HF/slimtune':>12s}")
    print(f"{'process s':12s} {w_ours:10.1f} {w_hf:10.1f} {w_hf / w_ours:12.2f}")
    print(f"{'step s':12s} {step_ours:10.2f} {step_hf:10.2f} {step_hf / step_ours:12.2f}")
    print(f"{'peak MiB':12s} {m_ours:10.0f} {m_hf:10.0f} {m_hf / m_ours:12.2f}")
    print(f"{'WER':12s} {res['wer'][0]:10.3f} {res['wer'][1]:10.3f}")
    print(f"{'exact match':12s} {res['exact_match'][0]:10.3f} {res['exact_match'][1]:10.3f}")
    print(f"(folder {tmp})")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
