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
