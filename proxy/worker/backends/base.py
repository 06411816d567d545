"""The Backend protocol every worker backend implements, and the errors it may raise.

Backends are plain Python: no HTTP. ``proxy.worker.server`` wraps one in the canonical internal API.
Generation methods are synchronous (they run in a worker thread); streaming ones return an
iterator of OpenAI-shaped chunk dicts, which the server closes when the client goes away.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from proxy.wire import CONTEXT_EXCEEDED, ImageRequest, ImageResult, Segment, SpeechRequest, TokenCount, TokenizeRequest


class BackendError(Exception):
    """The request cannot be served; ``status`` says whose fault it is; ``code`` and ``extra`` go into
    the error body (``proxy.wire.error_body``)."""

    status = 500
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra: dict[str, Any] = {}


class InvalidRequest(BackendError):
    status = 400


class ContextExceeded(InvalidRequest):
    """The prompt does not fit the model's context: said before any token is generated, with the counts
    (llama-server's ``n_prompt_tokens`` and ``n_ctx``), which the proxy words in each client's dialect."""

    code = CONTEXT_EXCEEDED

    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens, and the model's context holds {n_ctx}", param="messages"
        )
        self.extra = {"n_prompt_tokens": prompt_tokens, "n_ctx": n_ctx}


class TooLarge(BackendError):
    """The input is over one of the worker's limits (audio seconds, image pixels)."""

    status = 413


class Cancelled(BackendError):
    """The client went away and the backend stopped early (nobody reads the answer)."""

    status = 499


class NotSupported(BackendError):
    status = 404


class Backend(Protocol):
    """One loaded model inside a worker process."""

    name: str

    @staticmethod
    def prepare() -> None:
        """Optional, a static method: import the backend's libraries (called in the main thread before
        ``load``; a warm spare calls it on the class, before any model is known)."""

    def load(self) -> None:
        """Load the weights; called once, in a thread, before any request."""

    def progress(self) -> float:
        """0..1 while loading."""

    def info(self) -> dict[str, Any]:
        """What /health reports beside the state (device, memory, ...)."""

    def close(self) -> None:
        """Free what can be freed; the process exits right after."""


class BackendFailure(BackendError):
    """A backend bug or an unexpected failure: reported to the proxy, answered 500."""


# What a backend can do is the protocols it implements; the worker serves the routes that go with them.
@runtime_checkable
class Generator(Protocol):
    """An LLM backend: OpenAI's chat, completions and embeddings (a dict, or an iterator of SSE chunks).

    ``cancel`` (answers that are not streamed) is set when the client goes away: the backend stops within
    a token, raising ``Cancelled`` or returning what it has (the answer is thrown away).
    """

    def chat(
        self, body: dict[str, Any], cancel: threading.Event | None = None
    ) -> dict[str, Any] | Iterator[dict[str, Any]]: ...

    def completion(
        self, body: dict[str, Any], cancel: threading.Event | None = None
    ) -> dict[str, Any] | Iterator[dict[str, Any]]: ...

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class Tokenizer(Protocol):
    """An LLM backend that counts a request's prompt in its own tokens (``proxy.wire.TokenizeRequest``)."""

    def count_tokens(self, body: TokenizeRequest) -> TokenCount: ...


@runtime_checkable
class Transcriber(Protocol):
    """A speech-to-text backend: decode and transcribe one audio file (path or binary file object);
    returns the language and duration, and the segments as they are made."""

    def transcribe(self, audio: Any, params: dict[str, Any]) -> tuple[dict[str, Any], Iterator[Segment]]: ...


@runtime_checkable
class Speaker(Protocol):
    """A text-to-speech backend: encoded audio for the canonical speech request, chunk by chunk."""

    def speech(self, body: SpeechRequest) -> Iterator[bytes]: ...


@runtime_checkable
class ImageMaker(Protocol):
    """An image backend: the canonical image request in, PNGs (base64) with their seeds out.

    ``cancel`` is set when the client goes away; the backend stops at its next step.
    """

    def images(self, body: ImageRequest, cancel: threading.Event) -> ImageResult: ...
