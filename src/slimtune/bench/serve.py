"""`slimtune bench --preset serve`: many clients over many adapters, several ways, in one run.

    serve     `slimtune serve` (a real process on loopback) with N LoRA adapters; clients pick adapters
    (a)       one request at a time: set_adapter(name) + generate() per request, HF PEFT's PeftModel
              (how a PEFT user serves without a serving system); the same clients queue for it
    (b)       `slimtune serve`, every request to the base model (what the adapters cost)
    logprobs  serve's requests with `logprobs: true, top_logprobs: 5` (what log-probs cost)
    json      serve's requests with a strict `response_format` json_schema (what constrained decoding costs)
    json-len  serve's plain requests, each as long as its answer in json (the same work without a grammar)

Every request generates exactly --max-tokens tokens (ignore_eos / min_new_tokens; a json row ends
earlier when its object is complete: compared per generated token with serve, and with json-len,
whose requests stop where the json answers did, so both pay the same per-request costs), so the scenarios do
equal work; each client sends its requests back to back (closed loop). Reported: tokens/s (all
generated tokens over the wall time), p50/p95 request latency (queueing included), and the ratios
serve/(a) (target >= 4), serve/(b) (target >= 0.9), logprobs/serve (>= 0.95), json/serve (>= 0.85).
The server's HTTP costs count against the server's scenarios only; (a) runs in process with no HTTP.

    slimtune bench --preset serve                       # SmolLM2-135M, 16 adapters, 16 clients, 2 threads
    slimtune bench --preset serve --shape llama-0.85b --device cuda --dtype bfloat16   # random-init 0.85B
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPTS = ["A clumsy, overlong mess.", "Moving, funny and smart from start to finish.", "The plot never gets going.",
           "Two hours I will never get back.", "A quiet triumph of a film.", "Gorgeous to look at, empty inside.",
           "The best thing the director has made.", "Predictable but charming.", "Nothing works here.",
           "An instant classic.", "Too long by half, but the ending lands.", "Wooden acting, tired jokes.",
           "A sweet, small story told well.", "Loud, dumb and proud of it.", "I laughed, I cried.",
           "Forgettable in every way."]
QUESTION = "Is this movie review positive or negative? Explain briefly.\n\nReview: "
SHAPES = {"smollm2-135m": None, "llama-0.85b": "LLAMA_085B", "tiny": None}
SCHEMA = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]},
                                           "reason": {"type": "string"}},
          "required": ["sentiment", "reason"], "additionalProperties": False}
# the server's scenarios besides "serve" (the adapters, plain) and "base": the same requests with
# log-probs on, or with JSON-schema decoding; compared with "serve" per generated token
EXTRA = {"logprobs": ("slimtune serve, {n} adapters, logprobs + top_logprobs=5", {"logprobs": True, "top_logprobs": 5}),
         "json": ("slimtune serve, {n} adapters, response_format json_schema",
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA,
                                                                              "strict": True}}}),
         "json-len": ("slimtune serve, {n} adapters, plain, as long as each json answer", {})}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _model_folder(shape: str, work: Path) -> str:
    """The base model's folder: the packaged SmolLM2-135M, or a random-init Llama of a named shape
    saved once with SmolLM2's tokenizer (vocab sized to it)."""
    from ..train import models

    smol = models.resolve("smollm2-135m")
    if shape == "smollm2-135m":
        return smol
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from . import presets

    tok = AutoTokenizer.from_pretrained(smol)
    dims = dict(getattr(presets, SHAPES[shape])) if SHAPES[shape] else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    dims.update(vocab_size=len(tok), max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    out = work / shape
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _adapters(base: str, n: int, r: int, work: Path) -> dict[str, str]:
    """n LoRA adapters (r, all linear layers of a block) with random weights, saved in PEFT's format."""
    import torch
    from transformers import AutoModelForCausalLM

    from .. import LoraConfig, get_peft_model
    from .presets import TARGETS

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in pm.base_model.adapter_parameters("default"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        pm.save_pretrained(work / f"a{i}")
        out[f"a{i}"] = str(work / f"a{i}")
    return out


def with_adapters(wrapper, model, adapters: dict[str, str]):
    """`model` in `wrapper` (slimtune's or HF PEFT's PeftModel) with every adapter of `adapters`
    ({name: folder}) loaded under its name; the first one active."""
    names = list(adapters)
    pm = wrapper.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(adapters[n], adapter_name=n)
    return pm


def preset_in_process(prefix: str, n: int = 16, r: int = 16):
    """The serve preset's model in this process, for the benchmarks/serve_*.py scripts: SmolLM2-135M
    fp32 in slimtune's PeftModel with `n` random LoRA adapters (rank `r`, every linear of a block)
    saved under a fresh temporary folder named `prefix`...; (PeftModel, adapter names)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from .. import PeftModel
    from ..train import models

    base = models.resolve("smollm2-135m")
    adapters = _adapters(base, n, r, Path(tempfile.mkdtemp(prefix=prefix)))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return with_adapters(PeftModel, model, adapters), list(adapters)


def _jobs(clients: int, per_client: int, adapters: list[str]) -> list[list[tuple[str, str]]]:
    """Per client: its (adapter, prompt) requests; consecutive clients and requests use different adapters."""
    return [[(adapters[(c + j) % len(adapters)], QUESTION + PROMPTS[(c * per_client + j) % len(PROMPTS)])
             for j in range(per_client)] for c in range(clients)]


def _closed_loop(jobs, send) -> list[tuple[float, float, int]]:
    """Each client sends its requests one after another; (start, end, tokens) per request."""
    out: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(reqs):
        for job in reqs:
            t0 = time.perf_counter()
            try:
                n = send(*job)
            except BaseException as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
                return
            with lock:
                out.append((t0, time.perf_counter(), n))

    threads = [threading.Thread(target=client, args=(reqs,)) for reqs in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return out


def _stats(name: str, runs: list[list[tuple[float, float, int]]]) -> dict:
    """Over one or more runs: tokens over summed wall time, latency percentiles over all requests."""
    rows = [r for run in runs for r in run]
    lat = sorted(e - s for s, e, _ in rows)
    wall = sum(max(e for _, e, _ in run) - min(s for s, _, _ in run) for run in runs)
    toks = sum(n for _, _, n in rows)
    q = statistics.quantiles(lat, n=20, method="inclusive")
    return {"scenario": name, "runs": len(runs), "requests": len(rows), "tokens": toks, "wall_s": round(wall, 3),
            "tokens_per_s": round(toks / wall, 2), "p50_s": round(statistics.median(lat), 3), "p95_s": round(q[18], 3)}


class _Server:
    """`slimtune serve` in a child process on a free loopback port."""

    def __init__(self, base: str, adapters: dict[str, str], a) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "slimtune", "serve", "--model", base, "--served-model-name", "base",
               "--port", str(self.port), "--max-batch", str(a.max_batch), "--log-level", "warning",
               "--device", a.device, "--dtype", a.dtype, "--max-loaded", str(max(len(adapters), 1))]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        if a.prefix_cache_tokens is not None:
            cmd += ["--prefix-cache-tokens", str(a.prefix_cache_tokens)]
        if a.mixed_adapter_dtype != "model":
            cmd += ["--mixed-adapter-dtype", a.mixed_adapter_dtype]
        cmd += ["--lora-kernel", a.lora_kernel]
        if a.admit_wait_ms is not None:
            cmd += ["--admit-wait-ms", str(a.admit_wait_ms)]
        if a.dedicated_cpus:
            cmd += ["--dedicated-cpus"]
        for n, p in adapters.items():
            cmd += ["--adapter", f"{n}={p}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"slimtune serve did not start: {self.proc.stderr.read()[-2000:]}")
                time.sleep(0.3)

    def chat(self, model: str, text: str, max_tokens: int, **extra) -> int:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, **extra}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _one_at_a_time(base: str, adapters: dict[str, str], jobs, a) -> tuple[list, str]:
    """(a): a PeftModel with every adapter; one worker takes queued requests in order and, for each,
    set_adapter + generate. HF PEFT when installed (the anchor), else slimtune's PeftModel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..serve.text import chat_prompt

    try:
        from peft import PeftModel as Wrapper

        anchor = f"HF PEFT {__import__('peft').__version__}"
    except ImportError:
        from .. import PeftModel as Wrapper

        anchor = "slimtune PeftModel (HF PEFT not installed)"
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    model = with_adapters(Wrapper, model, adapters)
    model.eval()
    work: queue.Queue = queue.Queue()

    def worker():
        while True:
            item = work.get()
            if item is None:
                return
            name, text, done = item
            ids = torch.tensor([chat_prompt(tok, [{"role": "user", "content": text}])], device=a.device)
            model.set_adapter(name)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_tokens,
                                     min_new_tokens=a.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            done.put(out.shape[1] - ids.shape[1])

    th = threading.Thread(target=worker, daemon=True)
    th.start()

    def send(name, text):
        done: queue.Queue = queue.Queue()
        work.put((name, text, done))
        return done.get()

    send(next(iter(adapters)), QUESTION + PROMPTS[0])  # warm-up
    rows = _closed_loop(jobs, send)
    work.put(None)
    return rows, anchor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slimtune bench --preset serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="serve", choices=["serve"])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES),
                    help="the packaged SmolLM2-135M, or a random-init Llama of that shape")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--extra", nargs="*", default=list(EXTRA), choices=list(EXTRA),
                    help="server scenarios besides the adapters and the base alone (default: all)")
    ap.add_argument("--no-peft-baseline", dest="peft_baseline", action="store_false",
                    help="skip (a), the one-at-a-time HF PEFT loop (the slowest part)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (per round)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of serve and of (b), alternating (A B B A)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (server and (a)); 0 = torch's default")
    ap.add_argument("--prefix-cache-tokens", type=int, help="the server's prefix cache (0 = off; default: its own)")
    ap.add_argument("--mixed-adapter-dtype", default="model", choices=["model", "bfloat16"],
                    help="the server's --mixed-adapter-dtype (bfloat16: the adapters' stacked weights in bf16)")
    ap.add_argument("--lora-kernel", default="auto", choices=["auto", "on", "off"],
                    help="the server's --lora-kernel (mixed decode steps through slimtune's C++ kernel, or torch's bmm)")
    ap.add_argument("--admit-wait-ms", type=float,
                    help="the server's --admit-wait-ms (0: admit each request at once; default: the server's own)")
    ap.add_argument("--dedicated-cpus", action="store_true",
                    help="the server's --dedicated-cpus (one OpenMP pool, spinning workers: for a quiet machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", help="JSON path (default benchmarks/results/serve-<shape>-<device>.json; '-' for none)")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = _uptime()
    with tempfile.TemporaryDirectory(prefix="slimtune-serve-bench-") as tmp:
        work = Path(tmp)
        base = _model_folder(a.shape, work)
        adapters = _adapters(base, a.adapters, a.r, work)
        names = list(adapters)
        jobs = _jobs(a.clients, a.requests, names)
        base_jobs = [[("base", text) for _, text in reqs] for reqs in jobs]
        srv = _Server(base, adapters, a)
        try:
            _closed_loop([[(n, QUESTION + PROMPTS[0])] for n in names + ["base"]],
                         lambda m, t: srv.chat(m, t, 4))  # warm-up: every adapter once, together
            kinds = ["serve", "base"] + [k for k in EXTRA if k in a.extra or (k == "json" and "json-len" in a.extra)]
            for k in kinds[2:]:  # and each extra scenario once (JSON: llguidance's tokenizer is built on first use)
                srv.chat(names[0], QUESTION + PROMPTS[0], 4, **EXTRA[k][1])
            # the server's scenarios alternate A B C D D C B A ...: a load that drifts during the run
            # costs them alike
            runs: dict[str, list] = {k: [] for k in kinds}
            lens: dict = {}  # (adapter, prompt) -> its json answer's tokens (greedy: json-len uses the latest)

            def send(m, t, which, extra):
                if which == "json-len":
                    return srv.chat(m, t, lens[(m, t)])
                n = srv.chat(m, t, a.max_tokens, **extra)
                if which == "json":
                    lens[(m, t)] = n
                return n
            for rnd in range(a.rounds):  # (json runs before json-len in the first round)
                for which in (kinds if rnd % 2 == 0 else kinds[::-1]):
                    js = base_jobs if which == "base" else jobs
                    extra = EXTRA.get(which, (None, {}))[1]
                    runs[which].append(_closed_loop(js, lambda m, t, w=which, x=extra: send(m, t, w, x)))
            wd = "" if a.mixed_adapter_dtype == "model" else f" ({a.mixed_adapter_dtype} adapter weights)"
            wd += " (torch bmm, --lora-kernel off)" if a.lora_kernel == "off" else ""
            wd += f" (--admit-wait-ms {a.admit_wait_ms:g})" if a.admit_wait_ms is not None else ""
            wd += " (--dedicated-cpus)" if a.dedicated_cpus else ""
            serve = _stats(f"slimtune serve, {len(names)} adapters mixed{wd}", runs["serve"])
            base_only = _stats("(b) base model alone (slimtune serve)", runs["base"])
            extras = [_stats(EXTRA[k][0].format(n=len(names)), runs[k]) for k in kinds[2:]]
        finally:
            srv.stop()
        if a.peft_baseline:
            rows_a, anchor = _one_at_a_time(base, adapters, jobs, a)
            seq = _stats(f"(a) one at a time, set_adapter + generate ({anchor})", [rows_a])
        else:
            seq = None
    load_after = _uptime()
    res = {"shape": a.shape, "device": a.device, "dtype": a.dtype, "threads": a.threads, "clients": a.clients,
           "adapters": a.adapters, "requests_per_client": a.requests, "rounds": a.rounds, "max_tokens": a.max_tokens, "r": a.r,
           "max_batch": a.max_batch, "mixed_adapter_dtype": a.mixed_adapter_dtype, "lora_kernel": a.lora_kernel, "admit_wait_ms": a.admit_wait_ms, "dedicated_cpus": a.dedicated_cpus, "prefix_cache_tokens": a.prefix_cache_tokens, "torch": torch.__version__, "commit": _commit(),
           "uptime_before": load_before, "uptime_after": load_after,
           "rows": [serve] + ([seq] if seq else []) + [base_only] + extras,
           "serve_vs_a_tokens_per_s": round(serve["tokens_per_s"] / seq["tokens_per_s"], 2) if seq else None,
           "serve_vs_b_tokens_per_s": round(serve["tokens_per_s"] / base_only["tokens_per_s"], 2),
           **{f"{k}_vs_serve_tokens_per_s": round(r["tokens_per_s"] / serve["tokens_per_s"], 3)
              for k, r in zip(kinds[2:], extras)},
           **({"json_vs_json-len_tokens_per_s": round(extras[kinds.index("json") - 2]["tokens_per_s"]
                                                      / extras[kinds.index("json-len") - 2]["tokens_per_s"], 3)}
              if "json-len" in kinds else {}),
           "command": "slimtune bench " + " ".join(["--preset", "serve"] + [x for x in (argv or sys.argv[1:])
                                                                        if x not in ("--preset", "serve")])}
    table = format_table(res)
    print(table)
    out = a.out if a.out is not None else os.path.join("benchmarks", "results", f"serve-{a.shape}-{a.device}.json")
    if out != "-":
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(f"# slimtune serve benchmark ({a.shape}, {a.device}, {a.dtype})\n\n`{res['command']}`\n\n"
                    f"commit {res['commit']}, torch {res['torch']}; load before: `{load_before}`; after: "
                    f"`{load_after}`\n\n{table}\n")
        print(f"wrote {out}")
    return 0


def format_table(res: dict) -> str:
    a = next((r["tokens_per_s"] for r in res["rows"] if r["scenario"].startswith("(a)")), None)
    lines = [f"{res['clients']} concurrent clients x {res['requests_per_client']} requests (serve, (b): "
             f"{res.get('rounds', 1)} alternating rounds), {res['adapters']} LoRA "
             f"adapters (r={res['r']}, all linear layers), {res['max_tokens']} tokens each, {res['shape']} on "
             f"{res['device']} ({res['dtype']}, {res['threads'] or 'default'} threads)", "",
             "| scenario | requests | tokens | wall s | tokens/s | p50 latency s | p95 latency s | tokens/s vs (a) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        vs = f"{r['tokens_per_s'] / a:.2f}x" if a else "-"
        lines.append(f"| {r['scenario']} | {r['requests']} | {r['tokens']} | {r['wall_s']} | {r['tokens_per_s']} | "
                     f"{r['p50_s']} | {r['p95_s']} | {vs} |")
    lines += ["", (f"serve / (a) tokens/s: {res['serve_vs_a_tokens_per_s']}x (target >= 4); " if a else "")
              + f"serve / (b) tokens/s: {res['serve_vs_b_tokens_per_s']}x (target >= 0.9)"]
    for k, target in (("logprobs", 0.95), ("json", 0.85)):
        if f"{k}_vs_serve_tokens_per_s" in res:
            lines.append(f"{k} / serve tokens/s: {res[f'{k}_vs_serve_tokens_per_s']}x (target >= {target})")
    if "json_vs_json-len_tokens_per_s" in res:
        lines.append(f"json / json-len tokens/s (equal lengths): {res['json_vs_json-len_tokens_per_s']}x (target >= 0.85)")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
