"""The rest of the job on image classification: compare and search on a tiny ViT folder, export
refused with the merge that fits, and the CNN path (the digits CNN: its adapter records its base by
name, predict on pixel rows equals the adapter by hand, merge writes a state dict equal to the
adapter, inspect of EfficientNet-Lite0 shows its conv targets and head). The family defaults for
vit / clip / siglip and the CNN are the ones the job picks."""
import json

import pytest
import torch

from conftest_train import write_jsonl
from slimtune.cli.main import main
from test_task_image import make_images, tiny_vit  # noqa: F401 - the module fixture


def _yaml(path, model, photos, out):
    path.write_text(f"model: {model}\nmethod: lora\ndata:\n  train: {photos}\n  val_fraction: 0.3\n"
                    f"train:\n  max_steps: 6\n  lr: 2.0e-2\n  precision: fp32\n  eval_every: 3\n  cpu_threads: 1\n"
                    f"output_dir: {out}\n")
    return path


def test_compare_and_search_on_a_vit(tiny_vit, tmp_path, capsys):  # noqa: F811
    make_images(tmp_path / "photos", n=10)
    cfg = _yaml(tmp_path / "c.yaml", tiny_vit, tmp_path / "photos", tmp_path / "run")
    assert main(["compare", str(cfg), "--methods", "lora", "--steps", "6", "--no-probe", "--lr", "lora=2e-2",
                 "--no-config-row", "--test-fraction", "0.2", "--out", str(tmp_path / "cmp")]) == 0
    import csv

    rows = list(csv.DictReader((tmp_path / "cmp/compare.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "ok" and 0 <= float(rows[0]["test_metric"]) <= 1
    assert "(image_files, image_classification); objective accuracy" in capsys.readouterr().out
    assert main(["search", str(cfg), "--trials", "1", "--test-fraction", "0.2", "--out", str(tmp_path / "srch")]) == 0
    assert "test accuracy" in capsys.readouterr().out and (tmp_path / "srch/best.yaml").is_file()


def test_export_refuses_an_image_adapter(tiny_vit, tmp_path, capsys):  # noqa: F811
    make_images(tmp_path / "photos", n=6)
    assert main(["train", f"model={tiny_vit}", f"data.train={tmp_path / 'photos'}", "train.max_steps=2",
                 "train.precision=fp32", f"output_dir={tmp_path / 'run'}"]) == 0
    capsys.readouterr()
    for extra in ([], ["--merged"]):
        assert main(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "x.gguf"), *extra]) == 2
        err = capsys.readouterr().err
        assert "image_classification" in err and "slimtune merge --adapter" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnn")
    assert main(["train", "examples/digits_cnn_lora.yaml", "train.max_steps=4", "train.eval_every=4",
                 "train.cpu_threads=1", f"output_dir={d / 'run'}"]) == 0
    return d


def _digit_rows(n=6):
    from slimtune.train.datasets_offline import digits_5_9

    rows, _, _ = digits_5_9()
    return [{"pixels": r["pixels"]} for r in rows[:n]]


def _cnn_by_hand(adapter, rows):
    from slimtune import PeftModel
    from slimtune.train.tasks.image_classification import torch_model

    pm = PeftModel.from_pretrained(torch_model("digits-cnn"), str(adapter)).eval()
    x = torch.tensor([r["pixels"] for r in rows], dtype=torch.float32).unsqueeze(1)
    with torch.no_grad():
        return x, pm(pixel_values=x)["logits"].softmax(-1)


def test_cnn_predict_equals_the_adapter(cnn_run, tmp_path):
    ac = json.loads((cnn_run / "run/best/adapter_config.json").read_text())
    assert ac["base_model_name_or_path"] == "digits-cnn"
    rows = _digit_rows()
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["predict", str(cnn_run / "run"), str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 0
    out = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    _, prob = _cnn_by_hand(cnn_run / "run/best", rows)
    names = json.loads((cnn_run / "run/best/labels.json").read_text())
    assert [r["label"] for r in out] == [names[i] for i in prob.argmax(-1).tolist()]
    assert torch.allclose(torch.tensor([r["probability"] for r in out]), prob.max(-1).values, atol=1e-5)


def test_cnn_merge_equals_the_adapter(cnn_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from slimtune.train.tasks.image_classification import torch_model

    assert main(["merge", "--adapter", str(cnn_run / "run"), "--out", str(tmp_path / "m")]) == 0
    assert "load_state_dict" in capsys.readouterr().out
    meta = json.loads((tmp_path / "m/slimtune_model.json").read_text())
    assert meta == {"model": "digits-cnn", "num_labels": 5}
    merged = torch_model("digits-cnn")
    merged.load_state_dict(load_file(str(tmp_path / "m/model.safetensors")))
    x, prob = _cnn_by_hand(cnn_run / "run/best", _digit_rows())
    with torch.no_grad():
        assert torch.allclose(merged.eval()(pixel_values=x)["logits"].softmax(-1), prob, atol=1e-5)


def test_inspect_efficientnet_and_the_family_defaults(capsys):
    assert main(["inspect", "efficientnet-lite0"]) == 0
    out = capsys.readouterr().out
    assert "task image_classification" in out and "modules_to_save=['_fc']" in out
    assert "target_modules=['_expand_conv', '_project_conv', '_conv_head']" in out
    from transformers import CLIPConfig, SiglipConfig, ViTConfig

    from slimtune.train.config import JobConfig
    from slimtune.train.job import auto_method
    from slimtune.train.tasks import get_task

    spec = get_task("image_classification")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vis = dict(small, image_size=16, patch_size=8)
    for conf in (ViTConfig(**vis, num_labels=3), CLIPConfig(vision_config=vis, text_config=small, num_labels=3),
                 SiglipConfig(vision_config=vis, text_config=small, num_labels=3)):
        model = spec.model_class().from_config(conf)
        cfg = JobConfig.model_validate({"model": "x", "method": "lora", "data": {"train": "x.jsonl"}})
        ac, _ = auto_method(cfg, model, "image_classification")
        assert ac.target_modules == ["q_proj", "v_proj"] and ac.modules_to_save == ["classifier"], conf.model_type


def test_bad_image_rows_are_one_message_naming_the_row(tiny_vit, tmp_path, capsys):  # noqa: F811
    """An image path where the class should be, and a corrupt file named by its row in the file
    (the seeded splits reorder rows; the message counts them as the file does)."""
    make_images(tmp_path / "img", n=4)
    rows = [{"image": f"img/{c}/{i}.png", "label": c} for c in ("red", "green", "blue") for i in range(4)]
    write_jsonl(tmp_path / "swapped.jsonl", [{"image": r["label"], "label": r["image"]} for r in rows])
    assert main(["train", f"model={tiny_vit}", f"data.train={tmp_path / 'swapped.jsonl'}",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "the label column 'label' holds image file paths" in err and "not class names" in err
    write_jsonl(tmp_path / "ok.jsonl", rows)
    (tmp_path / "img/green/2.png").write_bytes(b"\x89PNG broken")
    assert main(["train", f"model={tiny_vit}", f"data.train={tmp_path / 'ok.jsonl'}", "data.val_fraction=0.5",
                 f"output_dir={tmp_path / 'o2'}"]) == 2
    err = capsys.readouterr().err
    assert "row 7: image file" in err and "green/2.png" in err and "cannot be read" in err and "Traceback" not in err


def test_cnn_eval_matches_its_best(cnn_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(cnn_run / "run")]) == 0
    best = json.loads((cnn_run / "run/best/best.json").read_text())
    assert f"accuracy {best['accuracy']:.4f}" in capsys.readouterr().out


def test_efficientnet_predict_on_a_folder_equals_the_adapter(tmp_path):
    """An EfficientNet-Lite0 adapter (the job's method choice: conv LoRA + `_fc` in full) predicts on a
    folder of images through `slimtune predict --model efficientnet-lite0`, as the adapter by hand."""
    from PIL import Image

    from slimtune import PeftModel, get_peft_model
    from slimtune.train.config import JobConfig
    from slimtune.train.job import auto_method
    from slimtune.train.tasks.cnn import cnn_processor
    from slimtune.train.tasks.image_classification import pixels, torch_model

    torch.manual_seed(0)
    model = torch_model("efficientnet-lite0", 3)
    cfg = JobConfig.model_validate({"model": "efficientnet-lite0", "method": "lora", "data": {"builtin": "textile_defects"}})
    ac, _ = auto_method(cfg, model, "image_classification")
    pm = get_peft_model(model, ac)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # a trained-looking adapter
    pm.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"] == "efficientnet-lite0"
    (tmp_path / "a/labels.json").write_text(json.dumps(["global", "local", "nominal"]))
    (tmp_path / "imgs").mkdir()
    for i, rgb in enumerate([(200, 40, 40), (40, 200, 40), (90, 90, 90)]):
        Image.new("RGB", (40, 30), rgb).save(tmp_path / "imgs" / f"{i}.png")
    assert main(["predict", str(tmp_path / "a"), str(tmp_path / "imgs"), "--out", str(tmp_path / "p.jsonl")]) == 0
    out = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    again = PeftModel.from_pretrained(torch_model("efficientnet-lite0", 3), str(tmp_path / "a")).eval()
    x = pixels(cnn_processor(), [Image.open(tmp_path / "imgs" / f"{i}.png").convert("RGB") for i in range(3)])
    with torch.no_grad():
        prob = again(pixel_values=x)["logits"].softmax(-1)
    assert [r["label"] for r in out] == [["global", "local", "nominal"][i] for i in prob.argmax(-1).tolist()]
    assert torch.allclose(torch.tensor([r["probability"] for r in out]), prob.max(-1).values, atol=1e-5)
