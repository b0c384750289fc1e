"""The serving benchmark's pipeline on a tiny random-init shape (not a measurement): a real
`slimtune serve` process, HF PEFT one request at a time, the base alone; JSON and markdown written."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_serve_bench_smoke(tmp_path):
    from slimtune.bench import main

    out = tmp_path / "serve.json"
    assert main(["--preset", "serve", "--shape", "tiny", "--clients", "3", "--adapters", "2", "--requests", "1",
                 "--rounds", "2", "--max-tokens", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    serve, seq, base, lps, js, jl = res["rows"]
    assert serve["tokens"] == base["tokens"] == lps["tokens"] == 2 * 3 * 3 and seq["tokens"] == 3 * 3  # max_tokens each
    assert 0 < js["tokens"] <= 2 * 3 * 3  # a json row may end when its object is complete
    assert jl["tokens"] == js["tokens"]  # json-len: plain requests as long as the (greedy, repeatable) json answers
    assert res["serve_vs_a_tokens_per_s"] > 0 and "uptime_before" in res
    assert res["logprobs_vs_serve_tokens_per_s"] > 0 and res["json_vs_serve_tokens_per_s"] > 0
    assert res["json_vs_json-len_tokens_per_s"] > 0
    md = (tmp_path / "serve.md").read_text()
    assert "| slimtune serve, 2 adapters mixed |" in md and "json_schema" in md and "top_logprobs" in md and "json / json-len" in md
