"""`slimtune ui [--runs DIR] [--port P]`: the browser page over a folder of runs (docs/ui.md)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CommandError

HELP = "a web page over a runs folder: watch, start, stop and resume runs; compare and search results"


def add_parser(sub) -> None:
    g = sub.add_parser("ui", help=HELP, description="Serve a page over DIR's run folders: their status, live loss / "
                       "lr / metric curves, reports; a form that starts `slimtune train`; stop (Ctrl-C semantics) and "
                       "resume; compare / search folders. Loopback only unless given --token. See docs/ui.md.")
    g.add_argument("--runs", default="runs", metavar="DIR", help="the folder whose runs the page shows and where new "
                   "runs go (default: runs)")
    g.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; any other needs --token)")
    g.add_argument("--token", default=os.environ.get("SLIMTUNE_UI_TOKEN"),
                   help="a secret every request must carry (default $SLIMTUNE_UI_TOKEN); required beyond loopback")
    g.add_argument("--serve", metavar="URL", default=os.environ.get("SLIMTUNE_SERVE_URL"),
                   help="a running `slimtune serve` for the Try it tab, e.g. http://127.0.0.1:8000 (the only address "
                   "the page's server contacts)")
    g.add_argument("--serve-key", default=os.environ.get("SLIMTUNE_SERVE_KEY"), help="its API key, if it has --keys")
    g.set_defaults(fn=run)


def run(a) -> int:
    from ..serve.server import is_loopback

    root = Path(a.runs).expanduser()
    if root.exists() and not root.is_dir():
        raise CommandError(f"--runs '{root}' is a file, not a folder; give the folder your runs are in")
    if not is_loopback(a.host) and not a.token:
        raise CommandError(f"refusing to listen on {a.host} without --token: anyone who can reach it could start "
                           "processes on this machine. Add --token SECRET (or set SLIMTUNE_UI_TOKEN), or keep the "
                           "default --host 127.0.0.1")
    if not 0 <= a.port <= 65535:
        raise CommandError(f"--port {a.port}: give a port from 1 to 65535 (0 = any free port)")
    if a.serve and not a.serve.startswith(("http://", "https://")):
        raise CommandError(f"--serve '{a.serve}': give the server's address, like http://127.0.0.1:8000")
    root.mkdir(parents=True, exist_ok=True)
    serve(root, a.host, a.port, a.token, a.serve, a.serve_key)
    return 0


def serve(root: Path, host: str, port: int, token: str | None, serve_url: str | None = None,
          serve_key: str | None = None) -> None:
    import socket

    import uvicorn

    from ..ui.app import build_app

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise CommandError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0 = any free "
                           "one)") from None
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"slimtune ui: http://{shown}:{port}/" + (f"?token={token}" if token else "") + f"  (runs folder {root.resolve()}"
          "; Ctrl-C stops the page, not the runs it started)", flush=True)
    app = build_app(root, token, serve_url, serve_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down, then re-raises the Ctrl-C / SIGTERM it caught
        pass
    print("slimtune ui stopped (runs it started go on; `slimtune ui` again shows them)", flush=True)
