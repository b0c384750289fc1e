"""image_classification through the whole job on a tiny random-init ViT (saved without an image
processor: the fallback builds one from its config) and an image folder made with PIL: train
improves held-out accuracy, the adapter saves `classifier` in full, predict on a folder equals the
adapter loaded by hand, merge equals the adapter; CSV rows of relative paths; the mistakes
(corrupt image, one class folder, a text column of paths) are one message each, exit 2."""
import json

import pytest
import torch

from conftest_train import job, tiny_bert, write_jsonl  # noqa: F401
from slimtune.cli.main import main
from slimtune.train.run import run_train

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def make_images(root, n=14, size=20, seed=0):
    """root/<class>/<i>.png: noisy images whose dominant colour is the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = np.clip(np.array(rgb) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype("uint8")
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=37, num_labels=2)
    path = tmp_path_factory.mktemp("vit")
    ViTForImageClassification(cfg).save_pretrained(path)  # no preprocessor_config.json: the fallback is used
    return path


@pytest.fixture(scope="module")
def image_run(tiny_vit, tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    make_images(d / "photos")
    cfg = job(tiny_vit, d / "run", {"train": str(d / "photos"), "val_fraction": 0.3},
              train={"max_steps": 24, "lr": 2e-2, "eval_every": 8, "precision": "fp32"}, method={"name": "lora"})
    res = run_train(cfg, log=lambda *_: None, progress=False)
    return d, res


def test_folder_trains_and_improves(image_run):
    d, res = image_run
    assert res["task"] == "image_classification" and res["format"] == "image_files"
    assert res["labels"] == ["blue", "green", "red"]
    assert res["metric"] == "accuracy" and "top2_accuracy" in res["after"] and "f1" in res["after"]
    assert res["after"]["accuracy"] > res["before"]["accuracy"] and res["after"]["accuracy"] >= 0.8
    ac = json.loads((d / "run/best/adapter_config.json").read_text())
    assert sorted(ac["target_modules"]) == ["q_proj", "v_proj"]  # ViT's query/value in transformers 5
    assert ac["modules_to_save"] == ["classifier"]
    from safetensors import safe_open

    with safe_open(str(d / "run/best/adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("classifier.weight") and f.get_slice(k).get_shape()[0] == 3 for k in f.keys())


def _by_hand(tiny_vit, adapter, files):
    from transformers import ViTForImageClassification

    from slimtune import PeftModel
    from slimtune.train.tasks.image_classification import image_processor, open_image

    base = ViTForImageClassification.from_pretrained(tiny_vit, num_labels=3, ignore_mismatched_sizes=True)
    pm = PeftModel.from_pretrained(base, adapter).eval()
    proc = image_processor(str(tiny_vit), log=lambda *_: None)
    x = proc(images=[open_image(f, "t") for f in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return pm, x, pm(pixel_values=x).logits.softmax(-1)


def test_predict_folder_equals_the_adapter(image_run, tiny_vit, tmp_path):
    d, _ = image_run
    assert main(["predict", str(d / "run"), str(d / "photos/red"), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    files = sorted((d / "photos/red").glob("*.png"))
    assert [r["image"] for r in rows] == [str(f) for f in files]
    _, _, prob = _by_hand(tiny_vit, d / "run/best", files)
    names = json.loads((d / "run/best/labels.json").read_text())
    assert [r["label"] for r in rows] == [names[i] for i in prob.argmax(-1).tolist()]
    assert torch.allclose(torch.tensor([r["probability"] for r in rows]), prob.max(-1).values, atol=1e-5)
    assert sum(r["label"] == "red" for r in rows) >= len(rows) * 0.7


def test_merge_equals_the_adapter(image_run, tiny_vit, tmp_path):
    from transformers import AutoModelForImageClassification

    d, _ = image_run
    assert main(["merge", "--adapter", str(d / "run/best"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    pm, x, prob = _by_hand(tiny_vit, d / "run/best", sorted((d / "photos/blue").glob("*.png"))[:4])
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=x).logits.softmax(-1), prob, atol=1e-5)
    assert merged.config.id2label[0] == "blue"


def test_inspect_detects_the_task(tiny_vit, capsys):
    assert main(["inspect", str(tiny_vit)]) == 0
    out = capsys.readouterr().out
    assert "task image_classification" in out and "modules_to_save=['classifier']" in out
    assert "target_modules=['q_proj', 'v_proj']" in out


def test_csv_of_relative_paths_and_a_corrupt_image(tiny_vit, tmp_path, capsys):
    make_images(tmp_path / "img", n=6)
    rows = [{"image": f"img/{c}/{i}.png", "label": c} for c in COLORS for i in range(6)]
    write_jsonl(tmp_path / "ok.jsonl", rows)
    cfg = job(tiny_vit, tmp_path / "run", {"train": str(tmp_path / "ok.jsonl")},
              train={"max_steps": 2, "precision": "fp32", "eval_before": False})
    res = run_train(cfg, log=lambda *_: None, progress=False)
    assert res["format"] == "image_files" and res["n_train"] + res["n_eval"] == 18
    (tmp_path / "img/red/3.png").write_bytes(b"not a png")
    capsys.readouterr()
    code = main(["train", f"model={tiny_vit}", f"data.train={tmp_path / 'ok.jsonl'}", f"output_dir={tmp_path / 'r2'}",
                 "data.val_fraction=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "red/3.png" in err and "row" in err and "cannot be read" in err and "Traceback" not in err


def test_one_class_folder_and_path_text_are_refused(tiny_vit, tiny_bert, tmp_path, capsys):
    make_images(tmp_path / "photos", n=3)
    for c in ("green", "blue"):
        for f in (tmp_path / "photos" / c).iterdir():
            f.unlink()
    assert main(["train", f"model={tiny_vit}", f"data.train={tmp_path / 'photos'}", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "one class folder ('red')" in err and "subfolder per class" in err
    write_jsonl(tmp_path / "paths.jsonl", [{"text": f"photos/{c}/{i}.png", "label": c} for c in COLORS for i in range(5)])
    assert main(["train", f"model={tiny_bert}", f"data.train={tmp_path / 'paths.jsonl'}",
                 f"output_dir={tmp_path / 'o2'}"]) == 2
    err = capsys.readouterr().err
    assert "holds image file paths" in err and "task: image_classification" in err
    write_jsonl(tmp_path / "imgs.jsonl", [{"image": f"photos/red/{i}.png", "label": str(i % 2)} for i in range(3)])
    assert main(["train", f"model={tiny_bert}", f"data.train={tmp_path / 'imgs.jsonl'}",
                 f"output_dir={tmp_path / 'o3'}"]) == 2
    err = capsys.readouterr().err
    assert "image files" in err and "not an image model" in err


def test_eval_of_the_run_matches_its_best(image_run, capsys):
    d, res = image_run
    capsys.readouterr()
    assert main(["eval", str(d / "run"), "train.precision=fp32"]) == 0
    out = capsys.readouterr().out
    assert "top2_accuracy" in out and f"{res['best']:.4f}" in out
