"""The client to one worker (or external server): httpx, over a Unix socket or TCP.

httpx errors are translated here, once, into the domain tree: a worker that cannot be reached or
goes away mid-answer is ``WorkerUnavailable``; an error status it sends is ``UpstreamError`` with
its own message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from proxy.errors import UpstreamError, WorkerUnavailable

_JSON = {"content-type": "application/json"}


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


class UpstreamStream:
    """An open streamed answer; whoever opened it closes it (``aclose`` in a finally)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            raise WorkerUnavailable("the worker went away mid-answer") from exc

    async def lines(self) -> AsyncIterator[str]:
        try:
            async for line in self.response.aiter_lines():
                yield line
        except httpx.TransportError as exc:
            raise WorkerUnavailable("the worker went away mid-answer") from exc

    async def aclose(self) -> None:
        await self.response.aclose()


class Upstream:
    def __init__(self, base_url: str, *, uds: str | None = None, name: str = "worker") -> None:
        transport = httpx.AsyncHTTPTransport(uds=uds, retries=0) if uds else None
        self.name = name
        self.base_url = base_url
        self.uds = uds
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=transport,
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    def _check_open(self) -> None:
        if self._client.is_closed:  # the worker died and was reaped between lease and request
            raise WorkerUnavailable(f"model '{self.name}' went away; try again")

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        self._check_open()
        try:
            response = await self._client.request(method, path, content=body, headers=_JSON if body else None)
        except httpx.TransportError as exc:
            raise WorkerUnavailable(f"model '{self.name}' is not reachable: {type(exc).__name__}") from exc
        return response.status_code, response.content

    async def post(self, path: str, body: bytes) -> bytes:
        """POST and return the body of a 2xx answer; an error status becomes UpstreamError."""
        status, content = await self.request("POST", path, body)
        if status >= 400:
            raise UpstreamError(status, _message_of(status, content))
        return content

    async def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        data = json.loads(await self.post(path, json.dumps(payload).encode()))
        if not isinstance(data, dict):
            raise UpstreamError(502, "the worker answered something other than a JSON object")
        return data

    async def open_stream(self, path: str, body: bytes) -> UpstreamStream:
        self._check_open()
        request = self._client.build_request("POST", path, content=body, headers=_JSON)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise WorkerUnavailable(f"model '{self.name}' is not reachable: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            try:
                content = await response.aread()
            except httpx.TransportError as exc:
                raise WorkerUnavailable("the worker went away mid-answer") from exc
            finally:
                await response.aclose()
            raise UpstreamError(response.status_code, _message_of(response.status_code, content))
        return UpstreamStream(response)

    async def health_report(self, path: str = "/health") -> dict[str, Any] | None:
        """What the worker says of itself (state, progress, device, ...); None if it cannot say."""
        try:
            response = await self._client.get(path, timeout=1.0)
            data = response.json()
        except (httpx.TransportError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def health(self, path: str = "/health") -> bool:
        try:
            response = await self._client.get(path, timeout=2.0)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._client.aclose()
