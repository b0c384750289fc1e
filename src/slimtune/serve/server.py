"""Assemble a server from a loaded base model and run it under uvicorn.

`make_server` is what the CLI and the tests share: registry (with --adapter folders loaded now, so
a bad one fails at start-up), keys and routes from keys.yaml, the bind check. `run` blocks in uvicorn.
"""
from __future__ import annotations

import ipaddress
import socket

from .config import ServeConfig
from .kvcache import CacheLayoutError, check_model
from .registry import Registry
from .routes import RouteError, Router
from .tenants import load_keys


class ServeError(ValueError):
    """A server that cannot start as asked; the message says why and what to pass instead."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def make_server(model, tokenizer, cfg: ServeConfig, adapters: dict[str, str] | None = None,
                adapters_dir: str | None = None, keys: str | None = None, routes: dict[str, dict[str, float]] | None = None,
                base_path: str | None = None):
    from .app import Server

    if not keys and not cfg.insecure and not is_loopback(cfg.host):
        raise ServeError(f"refusing to listen on {cfg.host} without --keys: anyone who can reach it could use every "
                         "adapter and the admin endpoints. Pass --keys keys.yaml, or --insecure if that is intended")
    from .speech import SpeechBaseError, is_speech_base

    text = not is_speech_base(model)  # a speech base transcribes (speech.py): no KV cache of its own to check
    if text:
        try:
            check_model(model)
        except CacheLayoutError as e:
            raise ServeError(str(e)) from None
    kernel_line = _lora_kernel(model, cfg) if text else None
    _check_mixed_dtype(cfg, kernel_line)
    registry = Registry(model, cfg.served_model_name, cfg.max_loaded, adapters_dir, cfg.allow_adapter_paths, text)
    if len(adapters or {}) > cfg.max_loaded:
        raise ServeError(f"{len(adapters)} --adapter flags but --max-loaded {cfg.max_loaded}: raise --max-loaded or "
                         "serve them from --adapters-dir (loaded on first use)")
    for name, path in (adapters or {}).items():
        registry.add(name, path, "cli")
    tenants, file_routes = load_keys(keys) if keys else (None, {})
    router = Router()
    for name, arms in {**file_routes, **(routes or {})}.items():
        try:
            router.set(name, arms)
        except RouteError as e:
            raise ServeError(str(e)) from None
    try:
        return Server(registry, tokenizer, cfg, tenants, router, base_path, kernel_line)
    except (RouteError, SpeechBaseError) as e:
        raise ServeError(str(e)) from None


def _check_mixed_dtype(cfg: ServeConfig, kernel_line: str | None) -> None:
    """--mixed-adapter-dtype bfloat16 only with the decode kernel on: a bf16 stack is storage (its
    weights are widened to fp32 as they are read, so no CPU needs native bf16), and only the kernel
    widens in registers; torch's decode path would widen the whole stack every step, slower than
    the fp32 stack it replaces (serve_lora_floor.py --kernel off: 104 against 94 ms a step). Runs
    after `_lora_kernel`, whose line (None for a speech base) says why the kernel is off."""
    if cfg.mixed_adapter_dtype == "model":
        return
    if cfg.mixed_adapter_dtype != "bfloat16":
        raise ServeError(f"--mixed-adapter-dtype {cfg.mixed_adapter_dtype}: use 'model' or 'bfloat16'")
    from ..kernels import lora_rows

    if kernel_line is None or not lora_rows.active():  # a speech base has no mixed decode, whatever the switch
        raise ServeError("--mixed-adapter-dtype bfloat16 halves the bytes a decode step reads only through the "
                         f"lora_rows kernel, which is not in use ({kernel_line or 'a speech base'}); leave "
                         "--mixed-adapter-dtype at 'model', or serve a CPU model with --lora-kernel auto|on")


def _lora_kernel(model, cfg: ServeConfig) -> str:
    """Switch the mixed-LoRA decode kernel as --lora-kernel asks (kernels/lora_rows.py); the line
    saying which path decode steps take. A model off the CPU keeps torch's ops (the kernel is CPU code)."""
    from ..kernels import lora_rows

    if cfg.lora_kernel not in lora_rows.MODES:
        raise ServeError(f"--lora-kernel {cfg.lora_kernel}: use one of {', '.join(lora_rows.MODES)}")
    if next(model.parameters()).device.type != "cpu":
        return lora_rows.enable("off").replace("(--lora-kernel off)", "(the model is not on the CPU)")
    try:
        return lora_rows.enable(cfg.lora_kernel)
    except lora_rows.KernelUnavailable as e:
        raise ServeError(f"--lora-kernel on: {e}") from None


def run(srv, log_level: str = "info") -> None:
    import uvicorn

    from .app import build_app

    uvicorn.run(build_app(srv), host=srv.cfg.host, port=srv.cfg.port, log_level=log_level, access_log=False)
