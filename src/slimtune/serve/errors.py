"""Errors as OpenAI writes them, and the body-size limit.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` with a 4xx for
anything the client sent: FastAPI's validation errors become 400 with the field as `param`,
unknown paths 404, wrong methods 405, bodies over the limit 413. An unexpected exception is a
500 with the same shape (and a log line); the fuzz test holds the server to never producing one.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("slimtune.serve")

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type or TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(model: str) -> APIError:
    """OpenAI's words for a model that does not exist: also what a key gets for a model it may not use."""
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.", "model",
                    "model_not_found")


def _validation_message(err: dict) -> tuple[str, str | None, str]:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "invalid")
    if kind == "json_invalid":
        return ("We could not parse the JSON body of your request. The body must be valid JSON "
                f"({err.get('ctx', {}).get('error', 'invalid JSON')})."), None, "invalid_json"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {loc[-1] if loc else '?'}", param, "unknown_parameter"
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    msg = err.get("msg", "invalid value")
    return f"Invalid value for '{param or 'body'}': {msg}.", param, "invalid_value"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        msg, param, code = _validation_message(errs[0]) if errs else ("Invalid request.", None, "invalid_value")
        return APIError(400, msg, param, code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        status = e.status_code if 400 <= e.status_code < 600 else 400
        msg = {404: f"Unknown request URL: {request.method} {request.url.path}.",
               405: f"Method {request.method} is not allowed for {request.url.path}."}.get(status, str(e.detail))
        return APIError(status, msg, code={404: "unknown_url", 405: "method_not_allowed"}.get(status),
                        headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error ({type(e).__name__}); the server log has the details",
                        code="internal_error").response()


class BodyLimit:
    """ASGI middleware: read the body up front (at most `limit` bytes, or a path's own limit: audio
    uploads), 413 past it, then replay it.

    Reading first means the app never sees part of an oversized body, and nothing inside the app
    has to raise (an exception there would reach Starlette's 500 handler first)."""

    def __init__(self, app, limit: int, paths: dict[str, tuple[int, str]] | None = None) -> None:
        self.app, self.limit, self.paths = app, limit, paths or {}  # path -> (its own limit, the flag naming it)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        limit, flag = self.paths.get(scope.get("path", ""), (self.limit, "--max-body-bytes"))
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                declared = int(cl)
            except ValueError:
                return await _send_error(send, APIError(400, "Content-Length is not a number.", code="invalid_header"))
            if declared > limit:
                return await _send_error(send, _too_large(limit, flag))
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            if len(body) > limit:
                return await _send_error(send, _too_large(limit, flag))
            more = msg.get("more_body", False)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client's disconnect

        return await self.app(scope, replay, send)


def _too_large(limit: int, flag: str) -> APIError:
    return APIError(413, f"The request body is larger than the server's limit of {limit} bytes ({flag}); send less "
                    "(a shorter clip, a compressed file) or raise the limit.", code="request_too_large")


async def _send_error(send, e: APIError) -> None:
    data = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
