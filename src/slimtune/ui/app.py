"""The UI's FastAPI app: a JSON API over the runs folder and one static page that polls it.

Stack: FastAPI + uvicorn (already slimtune's server stack), plotly.js for the curves served from the
`plotly` PyPI package's own copy (nothing from a CDN: the page works offline), markdown-it-py
(already installed with rich) to render reports with raw HTML escaped.

Security: every path the API takes is a name under the runs folder (`runs.inside`); files are served
only with a known suffix and not from hidden folders; POSTs must be JSON from the page's own origin
(a foreign web page cannot start or stop runs through the browser); with a token (required to bind
beyond loopback) every request needs it (header, cookie, or ?token= once, which sets the cookie).
"""
from __future__ import annotations

import hmac
import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from . import jobs as jobs_mod
from . import runs, studies
from .playground import Playground, PlaygroundError

STATIC = Path(__file__).parent / "static"
SERVED = {".png": "image/png", ".md": "text/plain", ".csv": "text/plain", ".yaml": "text/plain",
          ".jsonl": "text/plain", ".log": "text/plain", ".json": "application/json"}
COOKIE = "slimtune_ui_token"


def plotly_js() -> Path:
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the plotly package is missing: pip install 'slimtune[ui]'")
    return Path(spec.submodule_search_locations[0]) / "package_data" / "plotly.min.js"


def _md(text: str | None) -> str | None:
    if text is None:
        return None
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _err(msg: str, code: int = 400) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=code)


def build_app(root: Path, token: str | None = None, serve_url: str | None = None,
              serve_key: str | None = None) -> FastAPI:
    root = root.resolve()
    app = FastAPI(title="slimtune ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jobs = jobs = jobs_mod.Jobs(root)
    play = Playground(serve_url, serve_key)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = request.headers.get("x-slimtune-token") or request.cookies.get(COOKIE) or \
            request.query_params.get("token")
        if token and not (given and hmac.compare_digest(given, token)):
            return _err("this page needs its token: open the address `slimtune ui` printed (it ends in ?token=...)", 401)
        if request.method == "POST":
            origin = request.headers.get("origin")
            host = request.headers.get("host", "")
            if not request.headers.get("content-type", "").startswith("application/json") or \
                    (origin and origin.split("://", 1)[-1] != host):
                return _err("POSTs come from this page only (JSON, same origin)", 403)
        resp = await call_next(request)
        if token and request.query_params.get("token"):
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return resp

    def folder(name: str, run: bool = True) -> Path:
        p = root if name == "." else runs.inside(root, name)
        if run and not runs.is_run(p):
            raise runs.OutsideRoot(f"'{name}' is not a run folder under the runs folder")
        return p

    @app.exception_handler(runs.OutsideRoot)
    async def outside(request: Request, e: runs.OutsideRoot):
        return _err(str(e), 404)

    @app.exception_handler(jobs_mod.FormError)
    async def form_error(request: Request, e: jobs_mod.FormError):
        return _err(str(e), 400)

    @app.exception_handler(PlaygroundError)
    async def play_error(request: Request, e: PlaygroundError):
        return _err(str(e), 400)

    @app.get("/api/try/models")
    def try_models() -> dict[str, Any]:  # sync: runs in the thread pool while the server answers
        return play.models()

    @app.post("/api/try")
    def try_it(body: dict[str, Any]) -> dict[str, Any]:
        return play.ask(body)

    @app.post("/api/try/audio")
    def try_audio(body: dict[str, Any]) -> dict[str, Any]:  # a speech server: the clip's transcript(s)
        return play.transcribe(body)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name == "plotly.min.js":
            return FileResponse(plotly_js(), media_type="text/javascript")
        if name in ("app.js", "style.css"):
            return FileResponse(STATIC / name, media_type="text/javascript" if name.endswith(".js") else "text/css")
        return _err("no such file", 404)

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        rows = []
        for out in runs.find(root):
            try:
                r = runs.row(root, out)
            except Exception as e:  # noqa: BLE001 - one unreadable folder must not hide the others
                r = {"name": runs.name(root, out), "status": "unreadable", "why": f"{type(e).__name__}: {e}"[:300]}
            rows.append(r)
        known = {r["name"] for r in rows}
        for out in jobs.pending():  # started from the page, no run files yet: loading, or failed before training
            n = runs.name(root, out)
            if n in known:
                continue
            launched = jobs.launched(out) or {}
            rc = launched.get("returncode")
            last = (launched.get("output") or "").strip().splitlines()[-1:]
            rows.insert(0, {"name": n, "status": "starting" if rc is None else "failed",
                            "why": "loading the model and data" if rc is None else (last[0] if last else f"exit code {rc}")})
        return {"root": str(root), "runs": rows, "studies": studies.find(root)}

    @app.get("/api/run")
    def run_detail(name: str) -> dict[str, Any]:
        p = runs.inside(root, name) if name != "." else root
        launched = jobs.launched(p)
        if not runs.is_run(p):
            if launched is None:
                raise runs.OutsideRoot(f"'{name}' is not a run folder under the runs folder")
            return {"name": name, "status": "starting" if launched["returncode"] is None else "failed",
                    "records": [], "launched": launched}
        d = runs.detail(root, p)
        d["report_html"] = _md(d.pop("report"))
        d["launched"] = launched
        d["plot"] = runs.name(root, p / "plot.png") if (p / "plot.png").is_file() else None
        return d

    @app.get("/api/study")
    def study(name: str) -> dict[str, Any]:
        d = studies.detail(root, folder(name, run=False))
        d["report_html"] = _md(d.pop("report"))
        return d

    @app.get("/api/file")
    def file(path: str) -> Response:
        p = runs.inside(root, path)
        rel = p.relative_to(root).parts
        if p.suffix not in SERVED or any(x.startswith(".") for x in rel) or not p.is_file():
            return _err(f"'{path}' is not a file the page shows (only {', '.join(SERVED)} files in run folders)", 404)
        return FileResponse(p, media_type=SERVED[p.suffix])

    @app.post("/api/form")
    async def form(request: Request) -> dict[str, Any]:
        return {"yaml": jobs_mod.form_yaml(await _body(request))}

    @app.post("/api/validate")
    async def validate(request: Request) -> dict[str, Any]:
        cfg, out, path = jobs_mod.check(root, str((await _body(request)).get("yaml", "")))
        path.unlink(missing_ok=True)
        return {"ok": True, "output_dir": runs.name(root, out), "method": cfg.method_name(), "model": cfg.model_name()}

    @app.post("/api/start")
    async def start(request: Request) -> dict[str, Any]:
        return jobs.start(str((await _body(request)).get("yaml", "")))

    @app.post("/api/stop")
    async def stop(request: Request) -> dict[str, Any]:
        name = str((await _body(request)).get("name", ""))
        return jobs.stop(runs.inside(root, name))

    @app.post("/api/resume")
    async def resume(request: Request) -> dict[str, Any]:
        return jobs.resume(folder(str((await _body(request)).get("name", ""))))

    return app


async def _body(request: Request) -> dict[str, Any]:
    try:
        d = await request.json()
    except ValueError:
        raise jobs_mod.FormError("the request body is not JSON") from None
    if not isinstance(d, dict):
        raise jobs_mod.FormError("the request body must be a JSON object")
    return d
