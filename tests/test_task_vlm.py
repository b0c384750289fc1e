"""image_text_to_text through the job on tiny random-init LLaVA and Idefics3 (SmolVLM's
architecture) written by examples/make_tiny_vlm.py: `task: auto` picks it, training raises the
held-out exact match, labels cover the assistant tokens only, Idefics3 batches with different image
counts, predict / generate with an image, merge equals the adapter, and a placeholder mismatch is
one message naming the row (exit 2)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest_train import job, tiny_llama, write_jsonl  # noqa: F401 - a module fixture
from slimtune.cli.main import main
from slimtune.train.run import run_train

_spec = importlib.util.spec_from_file_location("make_tiny_vlm", Path(__file__).parents[1] / "examples/make_tiny_vlm.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(scope="module")
def vlm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    tiny.tiny_llava(root / "llava")
    tiny.tiny_idefics3(root / "idefics3")
    tiny.colour_data(root / "data", n_train=36, n_val=12)
    return root


def _cfg(root, family, out, **train):
    return job(root / family, out, {"train": str(root / "data/train.jsonl"), "validation": str(root / "data/validation.jsonl"),
                                    "max_length": 64},
               method={"name": "lora", "r": 16, "lora_alpha": 32, "finetune_vision_layers": True},
               train={"max_steps": 24, "batch_size": 6, "lr": 5e-3, "eval_every": 12, "precision": "fp32", **train},
               eval={"max_new_tokens": 3, "batch_size": 12})


@pytest.fixture(scope="module")
def llava_run(vlm_root):
    res = run_train(_cfg(vlm_root, "llava", vlm_root / "run_llava"), log=lambda *_: None, progress=False)
    return vlm_root / "run_llava", res


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_trains_and_answers(vlm_root, llava_run, family):
    res = llava_run[1] if family == "llava" else \
        run_train(_cfg(vlm_root, family, vlm_root / f"run_{family}"), log=lambda *_: None, progress=False)
    assert res["task"] == "image_text_to_text" and res["format"] == "vision_chat" and res["metric"] == "exact_match"
    assert res["before"]["exact_match"] < 0.5 and res["after"]["exact_match"] >= 0.75
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    ac = json.loads((vlm_root / f"run_{family}/best/adapter_config.json").read_text())
    assert "vision" in ac["target_modules"] and "language_model" in ac["target_modules"]


def test_default_targets_are_the_language_model(vlm_root):
    from slimtune.train.config import JobConfig
    from slimtune.train.job import auto_method
    from slimtune.train.tasks import get_task
    from slimtune.train.tasks.image_text_to_text import family_targets

    spec = get_task("image_text_to_text")
    model = spec.model_class().from_pretrained(vlm_root / "idefics3")
    cfg = JobConfig.model_validate({"model": str(vlm_root / "idefics3"), "method": "lora",
                                    "data": {"train": str(vlm_root / "data/train.jsonl")}})
    ac, why = auto_method(cfg, model, "image_text_to_text")
    import re

    names = [n for n, _ in model.named_modules() if re.fullmatch(ac.target_modules, n)]
    assert names and all(".text_model." in f".{n}." for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    both = family_targets(model, vision=True, language=True)
    assert any(re.fullmatch(both, n) and "vision_model" in n for n, _ in model.named_modules())


def test_labels_are_the_assistant_tokens(vlm_root):
    from slimtune.train.tasks.image_text_to_text import vlm_processor
    from slimtune.train.tasks.vlm_io import encode_row

    proc = vlm_processor(str(vlm_root / "llava"))
    row = {"messages": [{"role": "user", "content": "<image>Which colour do you see?"},
                        {"role": "assistant", "content": "red"},
                        {"role": "user", "content": "And this one? <image>"},
                        {"role": "assistant", "content": "blue"}],
           "images": ["images/train_000.png", "images/train_002.png"]}
    ex = encode_row(proc, row, "messages", str(vlm_root / "data/train.jsonl"), 1, 256)
    kept = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert proc.tokenizer.convert_ids_to_tokens(kept) == ["red", "<end>", "blue", "<end>"]
    assert ex["input_ids"].count(proc.tokenizer.convert_tokens_to_ids("<image>")) == 2 * 16
    assert ex["media"]["pixel_values"].shape == (2, 3, 32, 32) and ex["reference"] == "blue"


def test_idefics3_batches_rows_with_different_image_counts(vlm_root):
    from slimtune.train.tasks.image_text_to_text import vlm_processor
    from slimtune.train.tasks.vlm_io import collate_vlm, encode_row

    proc = vlm_processor(str(vlm_root / "idefics3"))
    src = str(vlm_root / "data/train.jsonl")
    one = {"messages": [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "red"}],
           "images": ["images/train_000.png"]}
    two = {"messages": [{"role": "user", "content": "<image><image>colours?"}, {"role": "assistant", "content": "red blue"}],
           "images": ["images/train_000.png", "images/train_002.png"]}
    batch = collate_vlm([encode_row(proc, one, "messages", src, 1, 128), encode_row(proc, two, "messages", src, 2, 128)],
                        proc.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32) and batch["pixel_attention_mask"].shape == (2, 2, 32, 32)
    assert batch["pixel_values"][0, 1].abs().sum() == 0  # the padded image, which the model drops
    from transformers import AutoModelForImageTextToText

    out = AutoModelForImageTextToText.from_pretrained(vlm_root / "idefics3")(**batch)
    assert torch.isfinite(out.loss)


def test_predict_generate_and_merge(vlm_root, llava_run, tmp_path, capsys):
    run, _ = llava_run
    data = vlm_root / "data/validation.jsonl"
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    refs = [json.loads(x)["messages"][-1]["content"] for x in data.read_text().splitlines()]
    assert len(rows) == len(refs) and sum(r["answer"] == g for r, g in zip(rows, refs)) >= 0.75 * len(refs)
    img = vlm_root / "data/images/validation_002.png"  # blue
    capsys.readouterr()
    assert main(["predict", str(run), str(img), "--prompt", "What colour is this image?"]) == 0
    by_file = json.loads(capsys.readouterr().out.splitlines()[0])
    assert by_file["image"] == str(img) and by_file["answer"] == rows[2]["answer"]
    assert main(["generate", "What colour is this image?", "--image", str(img), "--adapter", str(run)]) == 0
    assert capsys.readouterr().out.strip() == by_file["answer"]
    assert main(["merge", "--adapter", str(run / "best"), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["generate", "What colour is this image?", "--image", str(img), "--model", str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out.strip() == by_file["answer"]
    assert main(["predict", str(run), str(img)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_eval_of_the_run_matches_its_best(llava_run, capsys):
    run, res = llava_run
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert f"exact_match {res['best']:.4f}" in capsys.readouterr().out


def test_placeholder_mismatch_names_the_row(vlm_root, tmp_path, capsys):
    rows = [json.loads(x) for x in (vlm_root / "data/train.jsonl").read_text().splitlines()][:6]
    for r in rows:
        r["images"] = [str(vlm_root / "data" / p) for p in r["images"]]
    rows[3]["images"].append(rows[3]["images"][0])
    write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["train", f"model={vlm_root / 'llava'}", f"data.train={tmp_path / 'bad.jsonl'}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "row 4 has 1 <image> placeholder(s)" in err and "2 image(s)" in err and "Traceback" not in err
    rows[3]["images"] = rows[3]["images"][:1]
    write_jsonl(tmp_path / "text.jsonl", rows)
    assert main(["train", "task=causal_lm", f"model={vlm_root / 'llava'}", f"data.train={tmp_path / 'text.jsonl'}",
                 f"output_dir={tmp_path / 'o2'}"]) == 2
    assert "task: image_text_to_text" in capsys.readouterr().err


def test_a_corrupt_image_names_its_file_and_row(vlm_root, tmp_path, capsys):
    rows = [json.loads(x) for x in (vlm_root / "data/train.jsonl").read_text().splitlines()][:6]
    for k, r in enumerate(rows):
        r["images"] = [str(tmp_path / f"{k}.png") if k == 4 else str(vlm_root / "data" / p) for p in r["images"]]
    (tmp_path / "4.png").write_bytes(b"not an image")
    write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["train", f"model={vlm_root / 'llava'}", f"data.train={tmp_path / 'bad.jsonl'}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "row 5: image file" in err and "4.png" in err and "cannot be read" in err and "Traceback" not in err


def test_rows_a_vlm_cannot_learn_from(vlm_root, tiny_llama, tmp_path, capsys):  # noqa: F811
    rows = [json.loads(x) for x in (vlm_root / "data/train.jsonl").read_text().splitlines()][:6]
    for r in rows:
        r["images"] = [str(vlm_root / "data" / p) for p in r["images"]]
    rows[2]["messages"] = rows[2]["messages"][:1]  # no answer to learn
    write_jsonl(tmp_path / "q.jsonl", rows)
    assert main(["train", f"model={vlm_root / 'llava'}", f"data.train={tmp_path / 'q.jsonl'}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    assert "row 3 does not end with an assistant message" in capsys.readouterr().err
    rows[2]["messages"].append({"role": "assistant", "content": "red"})
    write_jsonl(tmp_path / "ok.jsonl", rows)
    assert main(["train", f"model={tiny_llama}", f"data.train={tmp_path / 'ok.jsonl'}",
                 f"output_dir={tmp_path / 'o2'}"]) == 2
    err = capsys.readouterr().err
    assert "not a vision-language model" in err and "Traceback" not in err
