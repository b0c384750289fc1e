"""The benchmark runs end to end on a tiny model (a smoke test: no timing is asserted)."""
import json

from slimtune.bench import PRESETS, format_table, main, run_benchmark


def test_presets_keep_the_real_shapes():
    assert PRESETS["cpu"].model["num_hidden_layers"] == 30 and PRESETS["cpu"].threads == 2
    assert PRESETS["gpu-6.7b"].model["hidden_size"] == 4096 and PRESETS["gpu-0.85b"].seq == 1024


def test_tiny_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--preset", "tiny", "--warmup", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    got = {(r["group"], r["scenario"]) for r in res["rows"]}
    assert {("train", "frozen"), ("train", "peft"), ("train", "slimtune"), ("infer", "slimtune"),
            ("infer", "slimtune_merged"), ("mixed", "peft"), ("mixed", "slimtune")} <= got
    assert "train_slimtune_vs_floor" in res["ratios"] and "mixed_peft_vs_slimtune" in res["ratios"]
    # same adapter weights in both libraries: same outputs, and the adapters do change the output
    assert res["checks"]["infer_max_abs_diff_vs_peft"] < 1e-4
    assert res["checks"]["mixed_max_abs_diff_vs_peft"] < 1e-4
    assert res["checks"]["infer_lora_effect_max_abs"] > 1e-3
    assert (tmp_path / "r.md").read_text().startswith("# slimtune bench")
    assert "| train | slimtune |" in capsys.readouterr().out


def test_subset_and_ablation_scenarios():
    res = run_benchmark("tiny", scenarios=["frozen", "slimtune_shared", "slimtune_function"], warmup=0)
    assert [r["scenario"] for r in res["rows"]] == ["frozen", "slimtune_shared", "slimtune_function"]
    assert all(r["mem_mib"] for r in res["rows"])
    assert "slimtune_shared" in format_table(res)


def test_paired_estimate_rows_interval_and_clean_model():
    """The paired estimate: one row per side, a bootstrap interval around the median pair ratio, and
    the shared model handed back with no adapter and no input gradients (later rows reuse it)."""
    import torch

    from slimtune.bench.core import build_model
    from slimtune.bench.paired import paired_rows
    from slimtune.methods.lora_layers import LoraLayer

    p = PRESETS["tiny"]
    model = build_model(p)
    x = torch.randint(0, p.model["vocab_size"], (p.batch, p.seq))
    checks: dict = {}
    rows = paired_rows(model, x, p, checks, pairs=5)
    assert [(r.group, r.scenario) for r in rows] == [("paired", "frozen"), ("paired", "slimtune")]
    assert len(rows[0].times_ms) == len(rows[1].times_ms) == 5 and rows[1].trainable > 0
    lo, hi = checks["paired_slimtune_ci95"]
    assert lo <= checks["paired_slimtune_vs_floor"] <= hi and checks["paired_pairs"] == 5
    assert not any(q.requires_grad for q in model.parameters())
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert model(input_ids=x).logits.requires_grad is False


def test_paired_scenario_in_a_run_and_table():
    res = run_benchmark("tiny", scenarios=["paired", "paired_peft", "paired_infer", "paired_infer_peft"], warmup=0, pairs=3)
    assert [(r["group"], r["scenario"]) for r in res["rows"]] == [
        ("paired", "frozen"), ("paired", "slimtune"), ("paired", "frozen_peft"), ("paired", "peft"),
        ("paired_infer", "base"), ("paired_infer", "slimtune"), ("paired_infer", "base_peft"), ("paired_infer", "peft")]
    assert {"paired_slimtune_vs_floor", "paired_peft_vs_floor", "paired_infer_slimtune_vs_base",
            "paired_infer_peft_vs_base"} <= set(res["ratios"])
    assert res["checks"]["paired_infer_slimtune_ci95"][0] <= res["checks"]["paired_infer_slimtune_vs_base"]
    assert "95% CI" in format_table(res) and len(res["checks"]["paired_peft_ci95"]) == 2


def test_bootstrap_interval_of_the_median():
    from slimtune.bench.paired import bootstrap_median_ci

    assert bootstrap_median_ci([1.1] * 7) == (1.1, 1.1)
    lo, hi = bootstrap_median_ci([1.0, 1.05, 1.1, 1.08, 1.2, 0.98, 1.07, 1.12])
    assert 0.98 <= lo <= 1.075 <= hi <= 1.2
