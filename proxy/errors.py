"""The domain exception tree.

Everything the proxy refuses or fails at is one of these. Domain code raises them without knowing
about HTTP; ``proxy.api.errors`` maps them to a status and to the caller's dialect in one place,
by walking the exception's MRO, so a new subclass inherits its parent's status.

::

    ProxyError                      500  something we did not foresee
    ├── BadRequest                  400  malformed JSON, missing or wrong-typed field, bad value
    │   ├── UnsupportedInput        400  valid, but this model cannot take it (images, ...)
    │   ├── FetchFailed             400  a URL in the request was refused or could not be fetched (host, why)
    │   └── ContextLengthExceeded   400  the prompt does not fit the model's context (its worker counted)
    ├── Unauthorized                401  no key or an unknown key
    ├── Forbidden                   403  a user key on an admin action; a foreign Host or Origin
    ├── NotFound                    404  unknown route
    │   └── ModelNotFound           404  no model by that name or alias
    ├── PayloadTooLarge             413  body over limits.max_body_bytes / max_json_bytes, audio too long
    ├── UnsupportedMediaType        415  a JSON route sent something other than JSON
    ├── TooManyRequests             429  (with Retry-After) over a per-key limit (limits.max_concurrent_per_key,
    │                                    jobs.max_queued_per_key, jobs.max_bytes_per_key)
    ├── Unavailable                 503  (with Retry-After) the model cannot serve right now
    │   ├── QueueFull                    more than limits.max_queue requests are waiting
    │   ├── ModelLoadFailed              its worker failed to start (reason and log tail inside)
    │   │   └── LoadTimeout              its worker did not become ready within load_timeout
    │   └── WorkerUnavailable            its worker went away (crashed, killed) while we talked
    │       └── WorkerHung                   it sent nothing for limits.worker_idle_timeout: killed
    ├── InsufficientMemory          507  the model needs more memory than the whole budget
    ├── ClientGone                  499  the client went away first (nginx's code; nobody reads it)
    └── UpstreamError               (the worker's status) the worker refused the request itself

``ConfigError`` is apart: it stops start-up and never reaches a client.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error a client can see."""

    status = 500
    code = "internal_error"
    openai_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request"
    openai_type = "invalid_request_error"


class UnsupportedInput(BadRequest):
    code = "unsupported_input"


class FetchFailed(BadRequest):
    """A URL in the request (an image, a voice sample) that the proxy refused to fetch or could not fetch:
    the message names the URL's host and why (proxy.fetch)."""

    code = "fetch_failed"

    def __init__(self, host: str, why: str, *, param: str | None = None) -> None:
        super().__init__(f"cannot fetch the URL on host '{host}': {why}", param=param)
        self.host = host
        self.why = why


class ContextLengthExceeded(BadRequest):
    """The prompt is longer than the model's context: found before any token is generated. The message is
    OpenAI's wording; ``api.errors`` words it for the other dialects from the counts."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens. Please reduce the length of the messages.",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


class Unauthorized(ProxyError):
    """Every 401 names the schemes it takes (``WWW-Authenticate``); ``api.errors`` adds Basic where it applies."""

    status = 401
    code = "invalid_api_key"
    openai_type = "authentication_error"
    REALM = "llm-proxy"

    def __init__(self, message: str, *, token_given: bool = False) -> None:
        super().__init__(message)
        self.token_given = token_given

    def headers(self) -> dict[str, str]:
        """RFC 6750's challenge: ``invalid_token`` with the reason when a key or token was sent."""
        if not self.token_given:
            return {"WWW-Authenticate": f'Bearer realm="{self.REALM}"'}
        reason = self.message.replace("\\", "").replace('"', "'")
        return {"WWW-Authenticate": f'Bearer realm="{self.REALM}", error="invalid_token", error_description="{reason}"'}


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"
    openai_type = "permission_error"


class NotFound(ProxyError):
    status = 404
    code = "not_found"
    openai_type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"model '{model}' not found", param="model")
        self.model = model


class Conflict(ProxyError):
    """The request is fine but the thing it names is not in a state for it (a job that did not fail, retried)."""

    status = 409
    code = "conflict"
    openai_type = "invalid_request_error"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"
    openai_type = "invalid_request_error"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "unsupported_media_type"
    openai_type = "invalid_request_error"


class TooManyRequests(ProxyError):
    """The caller is over one of its own limits (its requests in flight, its queued jobs): others are still served."""

    status = 429
    code = "rate_limit_exceeded"
    openai_type = "requests"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class Unavailable(ProxyError):
    status = 503
    code = "unavailable"
    openai_type = "server_error"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class QueueFull(Unavailable):
    code = "queue_full"


class ModelLoadFailed(Unavailable):
    code = "model_load_failed"


class LoadTimeout(ModelLoadFailed):
    code = "load_timeout"


class WorkerUnavailable(Unavailable):
    code = "worker_unavailable"


class WorkerHung(WorkerUnavailable):
    """The worker sent no byte for ``limits.worker_idle_timeout``; it is killed, the next request restarts it."""

    code = "worker_hung"


class InsufficientMemory(ProxyError):
    """The model can never fit: it needs more than the whole memory budget (or more than the models that
    may never be unloaded leave). Answered at once, never by trying and crashing."""

    status = 507
    code = "insufficient_memory"
    openai_type = "server_error"


class ClientGone(ProxyError):
    """The client went away before its answer was ready (nobody reads this answer)."""

    status = 499
    code = "client_closed_request"
    openai_type = "invalid_request_error"


class UpstreamError(ProxyError):
    """The worker answered with an error status; we relay its status and message."""

    code = "upstream_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.openai_type = "invalid_request_error" if 400 <= status < 500 else "server_error"


class ConfigError(Exception):
    """A configuration problem found at start-up: names the file, the key and what is wrong."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem
