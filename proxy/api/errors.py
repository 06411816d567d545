"""The one place where errors become HTTP responses, in the caller's dialect.

Ollama's routes (``/api/*``) answer ``{"error": "..."}``; Anthropic's (``/v1/messages*``, and
``/v1/models*`` asked with ``anthropic-version``) answer ``{"type": "error", "error": {"type", "message"}}``
with Anthropic's error types; every other route answers OpenAI's
``{"error": {"message", "type", "param", "code"}}``. The status comes from the exception class
(``proxy.errors``); Starlette finds the handler by walking the exception's MRO.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.api.common import caller
from proxy.auth import Role
from proxy.dialects.anthropic import error_body as anthropic_error
from proxy.dialects.anthropic import error_message as anthropic_message
from proxy.errors import ContextLengthExceeded, ProxyError, Unauthorized

log = logging.getLogger("proxy.api")


def _dialect(request: Request) -> str:
    path = request.url.path
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/messages") or (path.startswith("/v1/models") and "anthropic-version" in request.headers):
        return "anthropic"
    return "openai"


def render(
    request: Request,
    status: int,
    message: str,
    *,
    kind: str,
    code: str | None,
    param: str | None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    dialect = _dialect(request)
    if dialect == "ollama":
        return JSONResponse({"error": message}, status, headers=headers)
    if dialect == "anthropic":
        return JSONResponse(anthropic_error(status, message), status, headers=headers)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status, headers=headers)


_PATH = re.compile(r"(?<![\w.])(?:/[^\s/:'\"]+)+/?")


def for_users(detail: str) -> str:
    """What a user key sees of an internal message (a worker's log tail, a traceback): its first line,
    with file system paths left out. Admin keys get the whole detail."""
    first = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    return _PATH.sub("<path>", first)


def is_admin(request: Request) -> bool:
    return getattr(request.state, "role", Role.NONE) >= Role.ADMIN


def _basic_applies(request: Request) -> bool:
    """AUTOMATIC1111's routes, and any request that tried Basic, are offered Basic as well as Bearer."""
    sent = request.headers.get("authorization", "").strip().lower()
    return request.url.path.startswith("/sdapi/") or sent.startswith("basic")


def _headers(request: Request, exc: ProxyError) -> dict[str, str]:
    headers = exc.headers()
    if isinstance(exc, Unauthorized) and _basic_applies(request):
        headers["WWW-Authenticate"] += f', Basic realm="{exc.REALM}", charset="UTF-8"'
    return headers


async def proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    message = exc.message
    if exc.status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.message)
        if not is_admin(request):
            message = for_users(message)
    scoped = getattr(getattr(request.state, "principal", None), "models", None) is not None
    if scoped and exc.status >= 500:  # the model state's reasons (507, 503); a 4xx names only what was sent
        message = caller(request).hide_others(message) or message
    if isinstance(exc, ContextLengthExceeded):  # each dialect's own words for it (Claude Code matches its text)
        message = _context_message(_dialect(request), exc)
    headers = _headers(request, exc)
    return render(request, exc.status, message, kind=exc.openai_type, code=exc.code, param=exc.param, headers=headers)


def _context_message(dialect: str, exc: ContextLengthExceeded) -> str:
    if dialect == "anthropic":
        return anthropic_message(exc)
    if dialect == "ollama":
        return f"the input length ({exc.prompt_tokens} tokens) exceeds the context length ({exc.n_ctx} tokens)"
    return exc.message


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code != 404 else f"no route for {request.method} {request.url.path}"
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return render(request, exc.status_code, str(message), kind=kind, code=None, param=None, headers=exc.headers)


async def unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return render(
        request, 500, f"internal error: {type(exc).__name__}", kind="server_error", code="internal_error", param=None
    )


HANDLERS = {ProxyError: proxy_error, HTTPException: http_error, Exception: unexpected}
