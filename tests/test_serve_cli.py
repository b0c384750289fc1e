"""`slimtune serve` as a user runs it: a real process on a loopback port, the openai client, Ctrl-C;
mistakes as one line and exit code 2. The slow test checks the packaged SmolLM2-135M end to end:
the server's greedy chat answer equals `slimtune generate`'s for the same adapter."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from serve_support import build

PY = [sys.executable, "-m", "slimtune"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, timeout=120):
    return subprocess.run(PY + args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve_cli"), ["lora-a", "lora-b"])


def test_mistakes_are_one_line_and_exit_2(world, tmp_path, capsys):
    from slimtune.cli.main import main

    base, ads = world
    r = _run(["serve", "--model", str(base), "--host", "0.0.0.0"])  # a real process: exit code and stderr
    assert r.returncode == 2 and "without --keys" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys: [{key: sk-0123456789, admin: maybe}]")
    for args, words in [(["--adapter", f"x={tmp_path / 'missing'}"], "does not exist"),
                        (["--adapter", f"x={ads['lora-a']}", "--adapter", f"x={ads['lora-b']}"], "given twice"),
                        (["--keys", str(bad)], "keys.0.admin"), (["--route", "support=nope"], "--route"),
                        (["--route", "support=ghost:1"], "arm 'ghost' is not a loaded adapter"),
                        (["--adapters-dir", str(tmp_path / "none")], "no such folder"),
                        (["--allow-adapter-path", str(tmp_path / "none")], "--allow-adapter-path"),
                        (["--admit-wait-ms", "-5"], "--admit-wait-ms -5: give 0 or more"),
                        (["--admit-gap-ms", "nan"], "--admit-gap-ms nan: give 0 or more")]:
        assert main(["serve", "--model", str(base)] + args) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (args, err)


def test_serve_process_answers_the_openai_client_and_stops_on_ctrl_c(world, tmp_path):
    base, ads = world
    port = _free_port()
    d = tmp_path / "more"
    d.mkdir()
    os.symlink(ads["lora-b"], d / "dir-b")
    proc = subprocess.Popen(PY + ["serve", "--model", str(base), "--adapter", f"acme-a={ads['lora-a']}",
                                  "--adapters-dir", str(d), "--route", "support=acme-a:0.5,dir-b:0.5",
                                  "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        end = time.monotonic() + 90
        while True:
            try:
                models = sorted(m.id for m in client.models.list())
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() else "timeout"
                time.sleep(0.2)
        assert models == ["acme-a", "base", "dir-b", "support"]
        out = client.completions.create(model="dir-b", prompt="hello", max_tokens=4)
        assert out.usage.completion_tokens == 4 and out.model == "dir-b"
        routed = client.completions.with_raw_response.create(model="support", prompt="hi", max_tokens=2, user="u1")
        assert routed.headers["x-slimtune-route"] == "support"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, proc.stderr.read()


@pytest.mark.slow
def test_smollm_chat_equals_slimtune_generate(tmp_path):
    """SmolLM2-135M-Instruct with two LoRA adapters: the server's greedy chat answer for each equals
    what `slimtune generate --adapter` prints (same chat template, same tokens)."""
    import torch
    from starlette.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune import LoraConfig, get_peft_model
    from slimtune.serve import ServeConfig, build_app, make_server
    from slimtune.train import models

    path = models.resolve("smollm2-135m")
    folders = {}
    for i, name in enumerate(["calm", "terse"]):
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in pm.base_model.adapter_parameters("default"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        pm.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    prompt = "Text: A clumsy, overlong mess. Is this a movie review? Answer yes or no."
    # one `generate` run, both adapters: it prints "[adapter FOLDER]" and the answer for each
    r = _run(["generate", "--model", "smollm2-135m", "--adapter", str(folders["calm"]), "--adapter",
              str(folders["terse"]), "--max-new-tokens", "24", prompt], 300)
    assert r.returncode == 0, r.stderr
    want = {}
    for block in r.stdout.strip().split("\n\n[adapter "):
        head, _, text = block.partition("]\n")
        want[Path(head.removeprefix("[adapter ")).name] = text.strip()
    assert set(want) == set(folders)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    srv = make_server(model, AutoTokenizer.from_pretrained(path), ServeConfig(served_model_name="smollm2-135m"),
                      {n: str(f) for n, f in folders.items()})
    with TestClient(build_app(srv)) as c:
        for name in folders:
            r = c.post("/v1/chat/completions", json={"model": name, "max_tokens": 24,
                                                     "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"].strip() == want[name], name


@pytest.mark.parametrize("kernel", ["off", "auto"])
def test_mixed_adapter_dtype_bfloat16_exit_2_without_the_kernel(world, kernel, monkeypatch, capsys):
    """--mixed-adapter-dtype bfloat16 with --lora-kernel off: one line, exit 2. With the kernel the
    server is built, on the AVX2-only CPU kind as well (forced; the run itself is stubbed: no port)."""
    from slimtune.cli.main import main
    from slimtune.serve import server

    monkeypatch.setenv("SLIMTUNE_CPU_BF16", "0")
    built = []
    monkeypatch.setattr(server, "run", lambda srv, log_level="info": built.append(srv.cfg.mixed_adapter_dtype))
    rc = main(["serve", "--model", str(world[0]), "--mixed-adapter-dtype", "bfloat16", "--lora-kernel", kernel])
    err = capsys.readouterr().err
    if kernel == "off":
        assert rc == 2 and "only through the lora_rows kernel" in err and "Traceback" not in err
    else:
        assert rc == 0 and built == ["bfloat16"], err
