"""QLoRA in the job and the CLI: `model: {name, quantize: nf4}` trains, reports what quantizing saved,
merges exactly (or re-quantized with its cost), inspects; impossible requests are one message."""
import json
import sys

import pytest
import torch

from conftest_train import instruction_rows, job, tiny_llama, write_jsonl  # noqa: F401
from slimtune.cli.main import main
from slimtune.quant import quantized_linears
from slimtune.train.config import JobConfig, JobConfigError, load_config
from slimtune.train.run import run_train

quiet = dict(log=lambda *_: None, progress=False)


def _qjob(tiny_llama, tmp_path, precision="fp32", **model):
    """precision pinned (fp32 unless asked): `model.compute_dtype: auto` follows it, and the exactness
    checks below are about the fp32 compute path."""
    write_jsonl(tmp_path / "i.jsonl", instruction_rows(24))
    cfg = job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "i.jsonl")}, train={"precision": precision}).model_dump()
    cfg["model"] = {"name": str(tiny_llama), "quantize": "nf4", **model}
    return JobConfig.model_validate(cfg)


def test_model_keys_and_overrides():
    cfg = load_config(None, ["model.quantize=nf4", "model.compute_dtype=bf16"])
    assert cfg.model_name() == "smollm2-135m" and cfg.model_options().quantize == "nf4"
    assert cfg.model_options().double_quant is True and cfg.model_options().compute_dtype == "bf16"
    assert load_config(None, []).model_options().quantize == "none"
    with pytest.raises(JobConfigError, match="model.quantize"):
        load_config(None, ["model.quantize=nf2"])
    with pytest.raises(JobConfigError, match="did you mean 'model.quantize'"):
        load_config(None, ["model.quantise=nf4"])


@pytest.mark.parametrize("precision,compute", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_qlora_job_trains_and_reports_the_saving(tiny_llama, tmp_path, precision, compute):
    """compute_dtype auto = the job's precision (bf16: what `auto` picks on an AVX512-BF16 CPU, emulated
    elsewhere), and the report says which; no Linear4bit repacked by bitsandbytes' CPU inference path."""
    from conftest_qlora import is_repacked

    logs: list[str] = []
    res = run_train(_qjob(tiny_llama, tmp_path, precision), log=logs.append, progress=False)
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    assert res["quantization"].startswith(f"quantization: nf4 + double quant, compute {compute}, 14 linears")
    assert not any(is_repacked(res["trainer"].model))
    assert any(line.startswith("quantization: nf4") for line in logs)  # said at load time too
    report = (tmp_path / "run/report.md").read_text()
    assert "- quantization: nf4" in report and "saved" in report
    saved = yaml_model(tmp_path / "run/config.yaml")
    assert saved["quantize"] == "nf4" and saved["name"] == str(tiny_llama)


def yaml_model(path):
    import yaml

    return yaml.safe_load(path.read_text())["model"]


def test_job_refuses_a_method_that_cannot_train_on_a_quantized_base(tiny_llama, tmp_path, capsys):
    from slimtune.quant import QuantizationError

    cfg = _qjob(tiny_llama, tmp_path).model_dump()
    cfg["method"] = "full"
    with pytest.raises(QuantizationError, match="full cannot train on a quantized base"):
        run_train(JobConfig.model_validate(cfg), **quiet)
    assert not (tmp_path / "run" / "checkpoints").exists()
    write_jsonl(tmp_path / "i.jsonl", instruction_rows(24))
    assert main(["train", "--no-progress", f"model.name={tiny_llama}", "model.quantize=nf4", "method=full",
                 f"data.train={tmp_path / 'i.jsonl'}", "data.builtin=null", f"output_dir={tmp_path / 'r2'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: full cannot train on a quantized base") and err.count("\n") == 1


def test_missing_bitsandbytes_is_one_cli_message(tiny_llama, tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "i.jsonl", instruction_rows(24))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    assert main(["train", "--no-progress", f"model.name={tiny_llama}", "model.quantize=nf4",
                 f"data.train={tmp_path / 'i.jsonl'}", "data.builtin=null", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "needs the bitsandbytes package" in err and "pip install 'slimtune[quant]'" in err and err.count("\n") == 1


def test_cli_merge_dequantizes_exactly_and_requantizes_on_request(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from slimtune import PeftModel
    from slimtune.quant.config import load_kwargs

    res = run_train(_qjob(tiny_llama, tmp_path), **quiet)
    adapter = tmp_path / "run/best"
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "base quantized nf4 + double quant (compute fp32) as its run trained" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not list(quantized_linears(merged)) and "quantization_config" not in json.loads((tmp_path / "m/config.json").read_text())
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, **load_kwargs("nf4")), adapter)
    ids = torch.tensor([[5, 17, 99, 1000, 2000, 7]])
    with torch.no_grad():
        ref = unmerged(input_ids=ids).logits
        torch.testing.assert_close(merged(ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "q"), "--requantize"]) == 0
    out = capsys.readouterr().out
    assert "re-quantizing" in out and "costs: max |Δ|" in out and "(re-quantized)" in out
    cfgj = json.loads((tmp_path / "q/config.json").read_text())
    assert cfgj["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "f"), "--quantize", "none"]) == 0
    assert "base quantized" not in capsys.readouterr().out  # merged onto the full-precision base instead
    assert main(["eval", str(tmp_path / "run")]) == 0  # the run's config.yaml: the base quantized again
    out = capsys.readouterr().out
    assert res["quantization"] in out and "eval_loss" in out


def test_inspect_shows_the_quantized_size(tiny_llama, capsys):
    assert main(["inspect", str(tiny_llama), "--task", "causal_lm", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "quantization: nf4 + double quant" in out and "14 linears" in out and "q_proj: Linear4bit" in out
    dense = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    assert f"{dense:,d} parameters" in out  # packed 4-bit weights counted unpacked


@pytest.mark.slow
def test_smollm2_nf4_size_and_a_qlora_step():
    """The packaged SmolLM2-135M in NF4: the adapted linears take <= 0.30x their bf16 bytes, and a LoRA
    step after an eval pass trains (the job's eval-then-train order) with gradients equal to a step
    without it."""
    from transformers import AutoModelForCausalLM

    import slimtune
    from slimtune.quant import quantized_size
    from slimtune.quant.config import load_kwargs
    from slimtune.train.models import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m"), **load_kwargs("nf4"))
    size = quantized_size(model)
    assert size.layers == 210 and size.quant_bytes <= 0.30 * size.bf16_bytes
    pm = slimtune.get_peft_model(model, slimtune.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                            layers_to_transform=[28, 29], init_lora_weights=False))
    x = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))

    def step_grads(eval_first):
        if eval_first:
            pm.eval()
            with torch.no_grad():
                pm(x)
        pm.train()
        pm(input_ids=x, labels=x).loss.backward()
        g = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        pm.zero_grad(set_to_none=True)
        return g

    plain, after_eval = step_grads(False), step_grads(True)
    assert len(plain) == 8 and all(torch.equal(plain[k], after_eval[k]) for k in plain)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in plain.values())


def test_qlora_bench_runs_its_rows_on_the_tiny_preset(tmp_path):
    """The benchmark script's shape part end to end on a seconds-long preset (no timing asserted)."""
    from slimtune.bench.presets import PRESETS
    from slimtune.bench.qlora import markdown, run_shape

    res = run_shape(PRESETS["tiny"], log=lambda *_: None)
    assert [r["row"] for r in res["rows"]] == ["lora", "qlora", "peft_qlora"]
    by = {r["row"]: r for r in res["rows"]}
    assert by["qlora"]["trainable"] == by["peft_qlora"]["trainable"] == by["lora"]["trainable"] > 0
    assert by["qlora"]["weight_mib"] < by["lora"]["weight_mib"] and by["qlora"]["adapted_mib"] < by["lora"]["adapted_mib"]
    assert abs(by["qlora"]["first_loss"] - by["peft_qlora"]["first_loss"]) < 1e-4  # same base, same function
    assert "qlora" in markdown({"shape": res, "meta": {"date": "-", "versions": {}, "cpu": "-", "cores": 1,
                                                       "load_avg": (0, 0, 0)}}, "cmd")


def test_int8_job_with_gradient_checkpointing(tiny_llama, tmp_path):
    cfg = _qjob(tiny_llama, tmp_path, quantize="int8").model_dump()
    cfg["train"]["gradient_checkpointing"] = True
    res = run_train(JobConfig.model_validate(cfg), **quiet)
    assert res["quantization"].startswith("quantization: int8, 14 linears")
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
