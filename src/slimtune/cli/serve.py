"""`slimtune serve --model M --adapter NAME=PATH ...`: an OpenAI-compatible server for many adapters."""
from __future__ import annotations

import os

from .common import load_base, quiet_hf
from .errors import CommandError

HELP = "serve a base model and many adapters over an OpenAI-compatible HTTP API"


def add_parser(sub) -> None:
    from ..serve.config import ServeConfig

    d = ServeConfig()
    g = sub.add_parser("serve", help=HELP, description="One base model, many adapters, OpenAI-compatible "
                       "(/v1/models, /v1/completions, /v1/chat/completions, streaming; a speech base: "
                       "/v1/audio/transcriptions), continuous batching across "
                       "adapters, run-time load/unload, tenants with hashed keys, A/B routes, /metrics. "
                       "See docs/serving.md.")
    g.add_argument("--model", help="base model (builtin name or folder); default: the first adapter's base")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter folder served as NAME (loaded at start-up); repeat for several")
    g.add_argument("--adapters-dir", metavar="DIR", help="serve every sub-folder of DIR by its name, loaded on first use")
    g.add_argument("--allow-adapter-path", action="append", default=[], metavar="ROOT",
                   help="a folder under which POST /v1/load_lora_adapter may load adapters (besides --adapters-dir)")
    g.add_argument("--host", default=d.host, help="address to bind (default loopback; others need --keys or --insecure)")
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--keys", metavar="keys.yaml", help="API keys: tenants' adapters and routes, rate limits, admin")
    g.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --keys")
    g.add_argument("--route", action="append", default=[], metavar="NAME=A:W,B:W",
                   help="an A/B route, e.g. support=v1:0.9,v2:0.1 (requests with model=NAME get an arm)")
    g.add_argument("--served-model-name", help="the base model's id in the API (default: the --model name)")
    g.add_argument("--max-loaded", type=int, default=d.max_loaded, help="adapters resident in memory (LRU beyond)")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="rows decoded together")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 429")
    g.add_argument("--admit-wait-ms", type=float, default=d.admit_wait_ms,
                   help="on an idle server, how long the first request may wait for others arriving with it, so "
                        "they share one prefill (0 = admit at once)")
    g.add_argument("--admit-gap-ms", type=float, default=d.admit_gap_ms,
                   help="... stop waiting once no request has arrived for this long (a lone request waits this)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    g.add_argument("--max-audio-bytes", type=int, default=d.max_audio_bytes,
                   help="largest upload to /v1/audio/transcriptions (a speech base)")
    g.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                   help="longest clip transcribed (Whisper: also its 30 s window)")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a request may ask")
    g.add_argument("--max-n", type=int, default=d.max_n, help="choices per request")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds; then 408")
    g.add_argument("--prefix-cache-tokens", type=int, default=d.prefix_cache_tokens,
                   help="prompt-prefix KV kept for reuse, in tokens (0 = off)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the base model's dtype (adapters follow it)")
    g.add_argument("--mixed-adapter-dtype", default=d.mixed_adapter_dtype, choices=["model", "bfloat16"],
                   help="LoRA weights a mixed batch reads: the model's dtype (default, exact) or bfloat16 (half the "
                        "bytes per decode step, widened to fp32 as they are read: only the adapters' weights are "
                        "rounded; needs the decode kernel, --lora-kernel auto|on). See docs/serving.md")
    g.add_argument("--lora-kernel", default=d.lora_kernel, choices=["auto", "on", "off"],
                   help="mixed-adapter decode steps through slimtune's C++ kernel, built with gcc at start-up and "
                        "cached (auto: torch's bmm if it cannot build, said at start-up; on: refuse to start then; "
                        "off: torch's bmm)")
    g.add_argument("--dedicated-cpus", action="store_true",
                   help="the server has its CPUs to itself: one OpenMP thread pool whose workers spin between ops "
                        "(faster decode steps; leave off on a machine shared with other busy processes or under a "
                        "CPU quota, where spinning workers stall). See docs/serving.md")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.set_defaults(fn=run)


def parse_adapters(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:  # a bare folder: served under its folder name
            name, path = os.path.basename(os.path.normpath(item)), item
        if not name or not path:
            raise CommandError(f"--adapter {item!r}: write NAME=PATH (e.g. --adapter support-v1=runs/support/best)")
        if name in out:
            raise CommandError(f"--adapter: the name '{name}' is given twice; give each adapter its own name")
        out[name] = path
    return out


def parse_routes(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        arms: dict[str, float] = {}
        try:
            for part in spec.split(","):
                arm, _, w = part.rpartition(":")
                arms[arm.strip()] = float(w)
        except ValueError:
            arms = {}
        if not sep or not name or not arms or "" in arms:
            raise CommandError(f"--route {item!r}: write NAME=ADAPTER:WEIGHT,ADAPTER:WEIGHT (e.g. support=v1:0.9,v2:0.1)")
        out[name] = arms
    return out


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on, before minutes of model loading: bind it the way
    uvicorn will (SO_REUSEADDR) and let go at once. The message names a port that is free now."""
    import errno
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise CommandError(f"--host {host}: not an address this machine can listen on ({e}); "
                           "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
            return
        except OSError as e:
            err = e
    if err.errno == errno.EADDRINUSE:
        with socket.socket(family, kind, proto) as s:  # the OS's pick of a free port, for the message
            s.bind((addr[0], 0) + tuple(addr[2:]))
            free = s.getsockname()[1]
        raise CommandError(f"port {port} on {host} is already in use (another server is listening there); pass "
                           f"--port {free} (free now) or stop the other server")
    if err.errno == errno.EACCES:
        raise CommandError(f"port {port} needs administrator rights (ports below 1024 do); pass a port above 1023, "
                           "e.g. --port 8000")
    raise CommandError(f"cannot listen on {host}:{port}: {err.strerror}; check --host and --port")


def run(a) -> int:
    adapters = parse_adapters(a.adapter)
    routes = parse_routes(a.route)
    for flag, ms in (("--admit-wait-ms", a.admit_wait_ms), ("--admit-gap-ms", a.admit_gap_ms)):
        if not ms >= 0:  # also NaN
            raise CommandError(f"{flag} {ms:g}: give 0 or more milliseconds (0 admits a request at once)")
    check_port(a.host, a.port)  # first: a busy port fails in a second, not after torch and the model load
    import torch

    from ..serve import ServeConfig, ServeError, make_server
    from ..serve.registry import AdapterError
    from ..serve.server import run as run_server
    from ..serve.tenants import KeysFileError

    quiet_hf()
    from ..serve.server import is_loopback

    if not a.keys and not a.insecure and not is_loopback(a.host):  # before minutes of model loading
        raise CommandError(f"refusing to listen on {a.host} without --keys: anyone who can reach it could use every "
                           "adapter and the admin endpoints. Pass --keys keys.yaml, or --insecure if that is intended")
    if a.threads:
        torch.set_num_threads(a.threads)
    first = next(iter(adapters.values()), None)
    model, tok, path, task = load_base(a.model, first)
    try:
        model = model.to(device=torch.device(a.device), dtype=getattr(torch, a.dtype))
    except (RuntimeError, AssertionError) as e:
        raise CommandError(f"--device {a.device}: {e}") from None
    from ..serve.speech import is_speech_base

    if task != "CAUSAL_LM" and not is_speech_base(model):
        raise CommandError(f"serve generates text or transcribes speech: the base must be a causal LM or a speech "
                           f"recognizer (Whisper, Wav2Vec2 / HuBERT CTC), and {first or a.model} is a {task} model")
    # the API's name for the base: --served-model-name, a builtin name as given, else the folder's name
    name = a.served_model_name or (a.model if a.model and not os.path.isdir(a.model) else
                                   os.path.basename(os.path.normpath(a.model or str(path))))
    cfg = ServeConfig(host=a.host, port=a.port, served_model_name=name, max_batch=a.max_batch, max_queue=a.max_queue,
                      admit_wait_ms=a.admit_wait_ms, admit_gap_ms=a.admit_gap_ms, dedicated_cpus=a.dedicated_cpus,
                      max_loaded=a.max_loaded, max_body_bytes=a.max_body_bytes, max_prompt_tokens=a.max_prompt_tokens,
                      max_tokens=a.max_tokens, max_audio_bytes=a.max_audio_bytes,
                      max_audio_seconds=a.max_audio_seconds, max_n=a.max_n, request_timeout_s=a.request_timeout,
                      insecure=a.insecure, mixed_adapter_dtype=a.mixed_adapter_dtype, lora_kernel=a.lora_kernel,
                      prefix_cache_tokens=a.prefix_cache_tokens, allow_adapter_paths=tuple(a.allow_adapter_path))
    if a.adapters_dir and not os.path.isdir(a.adapters_dir):
        raise CommandError(f"--adapters-dir {a.adapters_dir}: no such folder")
    for root in a.allow_adapter_path:
        if not os.path.isdir(root):
            raise CommandError(f"--allow-adapter-path {root}: no such folder")
    try:
        srv = make_server(model.eval(), tok, cfg, adapters, a.adapters_dir, a.keys, routes, base_path=str(path))
    except (ServeError, KeysFileError, AdapterError) as e:
        raise CommandError(str(e)) from None
    if srv.kernel_line:
        print(f"slimtune serve: {srv.kernel_line}", flush=True)
    print(f"slimtune serve: {name} + {len(adapters)} adapter(s) on http://{a.host}:{a.port}/v1"
          + (" (keys required)" if a.keys else ""), flush=True)
    run_server(srv, a.log_level)
    return 0
