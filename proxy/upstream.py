"""The client to one worker (or external server): aiohttp, over a Unix socket or TCP.

aiohttp rather than httpx here: on the streaming hot path its C parser costs a fraction of
httpcore's per chunk (see bench/proxy_overhead.py). Its errors are translated here, once, into
the domain tree: a worker that cannot be reached or goes away mid-answer is ``WorkerUnavailable``;
an error status it sends is ``UpstreamError`` with its own message. A worker that sends no byte for
``idle_timeout`` seconds (aiohttp's ``sock_read``: from the last byte, or from the end of the request's
send for the first) is hung: ``on_hung`` is told (the supervisor kills it) and the call raises ``WorkerHung``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, BinaryIO

import aiohttp

from proxy import largejson
from proxy.errors import ContextLengthExceeded, ProxyError, UpstreamError, WorkerHung, WorkerUnavailable
from proxy.wire import StreamEnd, context_exceeded, sse_data

_JSON = {"content-type": "application/json"}
_GONE = (aiohttp.ClientError, ConnectionError, asyncio.IncompleteReadError)
_SILENT = aiohttp.SocketTimeoutError  # no byte from the worker for sock_read seconds (caught before _GONE)


def error_of(status: int, body: bytes) -> ProxyError:
    """The worker's error answer as the domain's: a prompt too long for the context (ours, or llama-server's
    ``n_prompt_tokens`` / ``n_ctx``) is ContextLengthExceeded, anything else UpstreamError with its message."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    counts = context_exceeded(data.get("error")) if isinstance(data, dict) else None
    if counts is not None:
        return ContextLengthExceeded(*counts)
    return UpstreamError(status, _message_of(status, body))


def _message_of(status: int, body: bytes) -> str:
    """The error message inside an OpenAI- or Ollama-shaped error body, else the body itself."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or f"worker answered {status}"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err:
            return str(err)
    return f"worker answered {status}"


@contextlib.contextmanager
def _translated(hung: Callable[[], WorkerHung], gone: Callable[[BaseException], str]) -> Iterator[None]:
    """aiohttp's errors as the domain's: no byte for ``idle_timeout`` is ``hung()``'s WorkerHung, a worker
    that cannot be reached or goes away is WorkerUnavailable with ``gone(exc)`` as its message."""
    try:
        yield
    except _SILENT as exc:  # before _GONE: aiohttp's timeouts are ClientErrors too
        raise hung() from exc
    except _GONE as exc:
        raise WorkerUnavailable(gone(exc)) from exc


def _mid_answer(exc: BaseException) -> str:
    return "the worker went away mid-answer"


class UpstreamStream:
    """An open streamed answer; whoever opened it closes it (``aclose`` in a finally)."""

    def __init__(self, response: aiohttp.ClientResponse, hung: Callable[[], WorkerHung]) -> None:
        self.response = response
        self._hung = hung

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Around a read of the answer: aiohttp's errors become the domain's (for a reader of ``response``
        that wants no generator layer of its own between it and aiohttp: ``relay.ObservedStream``)."""
        return _translated(self._hung, _mid_answer)

    async def raw(self) -> AsyncIterator[bytes]:
        with self.reading():
            async for chunk in self.response.content.iter_any():
                yield chunk

    async def lines(self) -> AsyncIterator[str]:
        with _translated(self._hung, _mid_answer):
            async for line in self.response.content:
                yield line.decode("utf-8").rstrip("\r\n")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """An OpenAI-style SSE stream as parsed chunks: an error event becomes UpstreamError, and a
        stream that ends without ``[DONE]`` (its worker died or cut it) WorkerUnavailable, never a
        silent end."""
        async for line in self.lines():
            try:
                chunk = sse_data(line)
            except StreamEnd:
                return
            if chunk is None:
                continue
            if "error" in chunk:
                err = chunk["error"]
                counts = context_exceeded(err)
                if counts is not None:
                    raise ContextLengthExceeded(*counts)
                raise UpstreamError(500, err.get("message", str(err)) if isinstance(err, dict) else str(err))
            yield chunk
        raise WorkerUnavailable("the worker ended the answer early")

    async def aclose(self) -> None:
        self.response.close()  # drops the connection: the worker sees its client go away


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        uds: str | None = None,
        name: str = "worker",
        idle_timeout: float = 0.0,
        on_hung: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.uds = uds
        self.idle_timeout = idle_timeout  # 0: wait for ever
        self._on_hung = on_hung
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def hung(self) -> WorkerHung:
        """The worker sent nothing for ``idle_timeout``: tell the owner (who kills it), and the error to raise."""
        why = f"model '{self.name}' sent nothing for {self.idle_timeout:g}s (limits.worker_idle_timeout)"
        if self._on_hung is not None:
            self._on_hung(f"{why}; killed")
            why += "; its worker was killed and restarts on the next request"
        return WorkerHung(why, retry_after=1)

    def _unreachable(self, exc: BaseException) -> str:
        return f"model '{self.name}' is not reachable: {type(exc).__name__}"

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use, inside the event loop that will use it."""
        if self._closed:  # the worker died and was reaped between lease and request
            raise WorkerUnavailable(f"model '{self.name}' went away; try again")
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self.uds:
                connector = aiohttp.UnixConnector(path=self.uds, limit=0)
            else:
                connector = aiohttp.TCPConnector(limit=0, use_dns_cache=False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=self.idle_timeout or None),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        with _translated(self.hung, self._unreachable):
            async with self.session.request(
                method, self.base_url + path, data=body, headers=_JSON if body else None
            ) as response:
                return response.status, await response.read()

    async def post(self, path: str, body: bytes) -> bytes:
        """POST and return the body of a 2xx answer; an error status becomes UpstreamError."""
        status, content = await self.request("POST", path, body)
        if status >= 400:
            raise error_of(status, content)
        return content

    async def post_json(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        return await largejson.answer_of(await self.post(path, json.dumps(payload).encode()))

    async def post_file(
        self,
        path: str,
        fields: dict[str, str],
        repeated: list[tuple[str, str]],
        file: tuple[str, str, BinaryIO, str | None],
    ) -> dict[str, Any]:
        """POST multipart/form-data, the file streamed from its file object; the JSON answer."""
        form = aiohttp.FormData()
        for key, value in [*fields.items(), *repeated]:
            form.add_field(key, value)
        name, filename, fileobj, content_type = file
        fileobj.seek(0)
        form.add_field(name, fileobj, filename=filename, content_type=content_type or "application/octet-stream")
        with _translated(self.hung, self._unreachable):
            async with self.session.post(self.base_url + path, data=form) as response:
                status, content = response.status, await response.read()
        if status >= 400:
            raise error_of(status, content)
        data = json.loads(content)
        if not isinstance(data, dict):
            raise UpstreamError(502, "the worker answered something other than a JSON object")
        return data

    async def open_stream(self, path: str, body: bytes, content_type: str = "application/json") -> UpstreamStream:
        with _translated(self.hung, self._unreachable):
            response = await self.session.post(self.base_url + path, data=body, headers={"content-type": content_type})
        if response.status >= 400:
            try:
                with _translated(self.hung, _mid_answer):
                    content = await response.read()
            finally:
                response.close()
            raise error_of(response.status, content)
        return UpstreamStream(response, self.hung)

    async def health_report(self, path: str = "/health") -> dict[str, Any] | None:
        """What the worker says of itself (state, progress, device, ...); None if it cannot say."""
        try:
            async with self.session.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                data = await r.json(content_type=None)
        except (*_GONE, TimeoutError, ValueError, WorkerUnavailable):
            return None
        return data if isinstance(data, dict) else None

    async def health(self, path: str = "/health") -> bool:
        try:
            async with self.session.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                return r.status == 200
        except (*_GONE, TimeoutError, WorkerUnavailable):
            return False

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
