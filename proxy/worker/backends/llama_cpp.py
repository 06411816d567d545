"""llama.cpp through llama-cpp-python, in-process in the worker.

Chat and completions run on one ``Llama``; embeddings on a second one created on first use with
``embedding=True`` (the weights are mmapped, so the pages are shared).

A ``Llama`` (its context, batch, sampler and prompt cache) must be used by one thread at a time:
two generations interleaved on it corrupt its state and end in a GGML_ASSERT (issue 16: a stream
cancelled by its client was still being generated when the next request began). So each context has
a lock, taken before a request touches it and released only when that request has let go of it: at
the end of a non-streamed call, or when a stream is exhausted or closed (``_Held``). This holds
however the server schedules its threads and however a cancelled consumer behaves.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from proxy.wire import TokenCount, TokenizeRequest
from proxy.worker.backends.base import Cancelled, ContextExceeded, InvalidRequest, NotSupported


@contextlib.contextmanager
def _progress_reported(report: Any) -> Iterator[None]:
    """llama.cpp's load progress (``llama_model_params.progress_callback``) while the block runs.

    ``Llama()`` takes no callback: it builds its params with ``llama_model_default_params()``, so that is
    wrapped for the block to set ours (a worker loads one model, in one thread)."""
    import llama_cpp.llama_cpp as capi

    def on_progress(fraction: float, _user_data: Any) -> bool:
        report(float(fraction))
        return True  # go on loading

    callback = capi.llama_progress_callback(on_progress)  # kept alive here until the load ends
    original = capi.llama_model_default_params

    def params() -> Any:
        out = original()
        out.progress_callback = callback
        return out

    capi.llama_model_default_params = params
    try:
        yield
    finally:
        capi.llama_model_default_params = original


# Request fields passed on to llama-cpp-python when its method takes them.
_RENAMES = {"max_completion_tokens": "max_tokens"}
_POOLING_MEAN = 1  # llama_cpp.LLAMA_POOLING_TYPE_MEAN, without importing llama_cpp here
# Never taken from a request: objects the wire cannot carry, or ours to set.
_SKIP = ("model", "stream_options", "logits_processor", "grammar", "stopping_criteria", "logprobs_processor")


_LIMITS = ("max_audio_seconds", "max_image_pixels")


class LlamaCppBackend:
    def __init__(self, name: str, model_path: str, options: dict[str, Any]) -> None:
        self.name = name
        self.model_path = model_path
        # the rest is for Llama(); the limits on decoded input are not for this backend
        self.options = {k: v for k, v in options.items() if k not in ("cache_dir", "mmproj", "chat_handler", *_LIMITS)}
        # a vision model: its image projector and the llama_chat_format class that loads it
        self.mmproj: str | None = options.get("mmproj")
        self.chat_handler: str = options.get("chat_handler") or "MTMDChatHandler"
        self._llm: Any = None
        self._embedder: Any = None
        self._embed_lock = threading.Lock()  # creates the embedder once
        self._context = threading.Lock()  # one user of self._llm at a time
        self._embed_context = threading.Lock()  # one user of self._embedder at a time
        self._loaded = False
        self._chat_params: frozenset[str] = frozenset()
        self._completion_params: frozenset[str] = frozenset()
        self._formatter: Any = None
        self._progress = 0.0  # llama.cpp's own, from its progress callback while the weights load

    # -- lifecycle -------------------------------------------------------------------------
    def _make(self, **extra: Any) -> Any:
        from llama_cpp import Llama

        opts = {k: v for k, v in self.options.items() if v is not None}
        return Llama(model_path=self.model_path, verbose=False, **opts, **extra)

    @staticmethod
    def prepare() -> None:
        import llama_cpp  # noqa: F401  (the import is the point: see proxy.worker.__main__)

    def _handler(self) -> Any:
        """The chat handler that reads images with the projector (``mmproj``): llama-cpp-python's
        ``chat_handler`` class, made to render a message's parts as one string (``_flat_parts``)."""
        from llama_cpp import llama_chat_format

        cls = getattr(llama_chat_format, self.chat_handler, None)
        bases = tuple(getattr(llama_chat_format, n) for n in ("MTMDChatHandler", "Llava15ChatHandler"))
        if not (isinstance(cls, type) and issubclass(cls, bases)):
            raise ValueError(
                f"chat_handler '{self.chat_handler}' is not a multimodal handler of llama_cpp.llama_chat_format "
                "(MTMDChatHandler, Qwen25VLChatHandler, Llava15ChatHandler, ...)"
            )
        kwargs: dict[str, Any] = {"clip_model_path": self.mmproj, "verbose": False}
        if "use_gpu" in inspect.signature(cls).parameters:
            kwargs["use_gpu"] = _device(self.options.get("n_gpu_layers")) == "gpu"
        if issubclass(cls, llama_chat_format.MTMDChatHandler):
            cls = type(cls.__name__, (cls,), {"_convert_message_for_template": classmethod(_flat_parts)})
        return cls(**kwargs)

    def load(self) -> None:
        extra = {"chat_handler": self._handler()} if self.mmproj else {}
        with _progress_reported(self._set_progress):
            self._llm = self._make(**extra)
        self._chat_params = frozenset(inspect.signature(self._llm.create_chat_completion).parameters)
        self._completion_params = frozenset(inspect.signature(self._llm.create_completion).parameters)
        self._formatter = self._chat_formatter()
        self._loaded = True

    def _chat_formatter(self) -> Any:
        """The GGUF's chat template as llama-cpp-python builds it (``Llama.__init__``), when the model uses
        it: what ``count_tokens`` renders a chat with."""
        from llama_cpp import llama_chat_format

        llm = self._llm
        template = llm.metadata.get("tokenizer.chat_template")
        if template is None or llm.chat_handler is not None or llm.chat_format != "chat_template.default":
            return None
        eos, bos = llm.token_eos(), llm.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def _set_progress(self, fraction: float) -> None:
        self._progress = fraction

    def progress(self) -> float:
        return 1.0 if self._loaded else self._progress

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": "llama_cpp", "device": _device(self.options.get("n_gpu_layers"))}
        if self.mmproj:
            info["vision"] = True
        if self._loaded:
            info["n_ctx"] = self._llm.n_ctx()  # the context llama.cpp made (n_ctx rounded up to 256)
        return info

    def close(self) -> None:
        # at exit: a generation still running is abandoned. Llama.close frees a vision model's multimodal
        # context too (the handler registers mtmd_free on the model's exit stack).
        for llm in (self._llm, self._embedder):
            if llm is not None:
                llm.close()
        self._llm = self._embedder = None

    # -- requests ---------------------------------------------------------------------------
    def _kwargs(self, body: dict[str, Any], allowed: frozenset[str], skip: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in body.items():
            key = _RENAMES.get(key, key)
            if key in allowed and key not in skip and value is not None:
                out[key] = value
        if "stop" in out and isinstance(out["stop"], str):
            out["stop"] = [out["stop"]]
        return out

    def _run(
        self,
        fn: Any,
        kwargs: dict[str, Any],
        stream: bool,
        include_usage: bool,
        cancel: threading.Event | None,
    ) -> Any:
        self._context.acquire()
        # a vision handler evaluates the whole prompt itself, the images included (no prefix reused)
        meter = _PromptMeter(self._llm, None if stream else cancel, fresh=self.mmproj is not None)
        try:
            meter.attach()
            result = fn(**kwargs)
        except ValueError as exc:  # llama-cpp-python's way of saying "bad request"
            meter.detach()
            self._context.release()
            raise _invalid(exc) from exc
        except BaseException:
            meter.detach()
            self._context.release()
            raise
        if not stream:
            meter.detach()
            self._context.release()
            result["model"] = self.name
            _with_cached(result.get("usage"), meter)
            return result
        # the stream holds the context until it ends or is closed, in whatever thread that happens
        return _Held(self._stream(result, include_usage, meter), self._context, meter)

    def _stream(
        self, chunks: Iterator[dict[str, Any]], include_usage: bool, meter: _PromptMeter
    ) -> Iterator[dict[str, Any]]:
        completion_tokens = 0
        last: dict[str, Any] | None = None
        try:
            for chunk in chunks:
                chunk["model"] = self.name
                choice = chunk["choices"][0] if chunk.get("choices") else None
                delta = choice.get("delta") or {} if choice is not None else {}
                if delta.get("content") or delta.get("tool_calls") or (choice or {}).get("text"):
                    completion_tokens += 1
                last = chunk
                yield chunk
        except ValueError as exc:  # raised when the stream starts (a prompt the context cannot hold)
            raise _invalid(exc) from exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            meter.detach()
        if include_usage and last is not None:
            # llama-cpp-python's stream carries no usage: the meter saw the prompt go in
            usage = {
                "prompt_tokens": meter.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": meter.prompt_tokens + completion_tokens,
            }
            yield {
                "id": last.get("id"),
                "object": last.get("object"),
                "created": last.get("created"),
                "model": self.name,
                "choices": [],
                "usage": _with_cached(usage, meter),
            }

    def _check_room(self, prompt_tokens: int) -> None:
        """A prompt the context cannot hold with room for one token of answer: refused before any work.
        (A ``max_tokens`` beyond the room left is clipped to it by llama-cpp-python, as llama-server does.)"""
        n_ctx = int(self._llm.n_ctx())
        if prompt_tokens >= n_ctx:
            raise ContextExceeded(prompt_tokens, n_ctx)

    def _chat_prompt_tokens(self, messages: list[Any], body: dict[str, Any]) -> int | None:
        """The prompt a chat would feed the model, in tokens (as ``count_tokens`` counts it); None where
        the model does not use its GGUF's template (llama-cpp-python then checks it itself)."""
        if self._formatter is None:
            return None
        try:
            rendered = self._formatter(messages=messages, tools=body.get("tools"), tool_choice=body.get("tool_choice"))
        except Exception:  # the template refused these messages: llama-cpp-python's call says so
            return None
        tokens = self._llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        return len(tokens)

    def chat(self, body: dict[str, Any], cancel: threading.Event | None = None) -> Any:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty list", param="messages")
        kwargs = self._kwargs(body, self._chat_params, _SKIP)
        if self.mmproj:
            kwargs["messages"] = [_with_images(m, i) for i, m in enumerate(messages)]
        else:
            kwargs["messages"] = [_text_only(m, i) for i, m in enumerate(messages)]
        counted = self._chat_prompt_tokens(kwargs["messages"], body)
        if counted is not None:
            self._check_room(counted)
        if "response_format" in kwargs:
            kwargs["response_format"] = _response_format(kwargs["response_format"])
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self._run(self._llm.create_chat_completion, kwargs, stream, include_usage, cancel)

    def completion(self, body: dict[str, Any], cancel: threading.Event | None = None) -> Any:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise InvalidRequest("'prompt' must be a string", param="prompt")
        kwargs = self._kwargs(body, self._completion_params, _SKIP)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self._run(self._llm.create_completion, kwargs, stream, include_usage, cancel)

    def count_tokens(self, body: TokenizeRequest) -> TokenCount:
        """The prompt a chat call would feed the model, in its tokens: the messages rendered by the GGUF's
        own chat template (as llama-cpp-python renders it for ``chat``), or a bare ``prompt``."""
        messages = body.get("messages")
        if isinstance(messages, list):
            if self._formatter is None:
                raise NotSupported("this model has no chat template in its GGUF to count a chat with")
            try:
                rendered = self._formatter(messages=messages, tools=body.get("tools"))
            except Exception as exc:  # the template refused these messages (jinja2's own errors)
                raise InvalidRequest(f"the model's chat template cannot render these messages: {exc}") from exc
            text, add_bos = rendered.prompt, not rendered.added_special
        elif isinstance(body.get("prompt"), str):
            text, add_bos = body["prompt"], True
        else:
            raise InvalidRequest("'messages' or 'prompt' is required", param="messages")
        return {"count": len(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))}

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise InvalidRequest("'input' must be a string or a list of strings", param="input")
        with self._embed_lock:
            if self._embedder is None:
                # A model without its own pooling (most chat models) is mean-pooled.
                self._embedder = self._make(embedding=True, pooling_type=_POOLING_MEAN)
        started = time.perf_counter_ns()
        try:
            with self._embed_context:
                for i, text in enumerate(inputs):
                    # no token: llama_decode fails on the empty batch and leaves the heap corrupt (abort later)
                    if not self._embedder.tokenize(text.encode("utf-8"), add_bos=True, special=True):
                        raise InvalidRequest(f"'input' item {i} has no tokens to embed", param="input")
                vectors, tokens = self._embedder.embed(inputs, normalize=False, truncate=True, return_count=True)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        data = []
        for i, vec in enumerate(vectors):
            norm = math.sqrt(sum(x * x for x in vec)) or 1.0
            data.append({"object": "embedding", "index": i, "embedding": [x / norm for x in vec]})
        return {
            "object": "list",
            "data": data,
            "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "duration_ns": time.perf_counter_ns() - started,
        }


class _PromptMeter:
    """Hooks on one ``Llama`` for one call (its caller holds the context's lock): what the prompt cost, and
    a way to stop.

    llama-cpp-python's ``generate`` gets the prompt's tokens, keeps the prefix its context already holds from
    the last call (``n_tokens``) and evaluates the rest with ``eval``: so ``prompt_tokens`` is what
    ``generate`` got, and ``cached_tokens`` is ``n_tokens`` at the first ``eval`` (the tokens not evaluated
    again: OpenAI's ``prompt_tokens_details.cached_tokens``). With ``cancel``, ``eval`` raises ``Cancelled``
    before the next token once it is set (a logits processor cannot stop it: those run as a ctypes callback,
    whose exceptions are swallowed; stopping_criteria exists for completions only). The state left behind
    is the one a closed stream leaves: the tokens evaluated so far, reused as a prefix."""

    def __init__(self, llm: Any, cancel: threading.Event | None, fresh: bool = False) -> None:
        self.llm = llm
        self.cancel = cancel
        self.fresh = fresh  # the prompt was evaluated from an empty context (a vision chat): nothing cached
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self._evaluated = False

    def attach(self) -> None:
        llm, cls = self.llm, type(self.llm)

        def generate(tokens: Any, *args: Any, **kwargs: Any) -> Any:
            tokens = list(tokens)
            self.prompt_tokens = len(tokens)
            self._evaluated = False
            return cls.generate(llm, tokens, *args, **kwargs)

        def evaluate(tokens: Any) -> None:
            if not self._evaluated:
                self._evaluated = True
                self.cached_tokens = 0 if self.fresh else int(llm.n_tokens)
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("the client went away")
            cls.eval(llm, tokens)

        llm.generate = generate
        llm.eval = evaluate

    def detach(self) -> None:
        for name in ("generate", "eval"):  # the class's methods again
            self.llm.__dict__.pop(name, None)


def _with_cached(usage: Any, meter: _PromptMeter) -> Any:
    """OpenAI's usage with the prompt tokens llama.cpp reused from its context."""
    if isinstance(usage, dict):
        usage["prompt_tokens_details"] = {"cached_tokens": min(meter.cached_tokens, meter.prompt_tokens)}
    return usage


def _invalid(exc: ValueError) -> InvalidRequest:
    """llama-cpp-python's ValueError (its way of saying "bad request") as the backend's error."""
    return InvalidRequest(str(exc))


def _device(n_gpu_layers: Any) -> str:
    """Where the layers run: a GPU only when some are offloaded and llama.cpp was built with one."""
    import llama_cpp

    return "gpu" if n_gpu_layers and llama_cpp.llama_supports_gpu_offload() else "cpu"


def _response_format(value: Any) -> dict[str, Any]:
    """OpenAI's response_format -> llama-cpp-python's (json_schema becomes json_object + schema)."""
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            '\'response_format\' must be {"type": "text" | "json_object" | "json_schema"}',
            param="response_format",
        )
    if value["type"] == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("'response_format.json_schema.schema' must be an object", param="response_format")
        return {"type": "json_object", "schema": schema}
    return dict(value)


class _Held:
    """An iterator that holds ``lock`` until it is exhausted or closed (once), from any thread; one
    that is dropped unstarted lets go when it is collected."""

    def __init__(self, items: Iterator[dict[str, Any]], lock: Any, meter: _PromptMeter | None = None) -> None:
        self._items = items
        self._lock: Any = lock
        self._meter = meter

    def __iter__(self) -> _Held:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._items)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            try:
                close = getattr(self._items, "close", None)
                if close is not None:
                    close()
            finally:
                if self._meter is not None:  # a stream closed before it started has not detached it
                    self._meter.detach()
                lock.release()

    def __del__(self) -> None:
        self.close()


def _text_only(message: Any, i: int) -> Any:
    """A message whose content is OpenAI's array of parts, as llama.cpp's chat templates take it: the
    text parts joined into one string (a template given the array fails with a TypeError). A model without
    an image projector refuses an image part with 400."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    texts: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"messages[{i}] has a part of type {kind!r}; this llama.cpp model reads text only "
                "(a vision model names its image projector: model.mmproj)",
                param="messages",
            )
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _flat_parts(cls: Any, message: Any, media_marker: str) -> dict[str, Any]:
    """A message for the chat template of a vision model (``MTMDChatHandler._convert_message_for_template``):
    its parts as one string, each image as mtmd's media marker where it stood. llama-cpp-python's own
    conversion keeps the array (image parts as text parts), which templates that concatenate ``content`` as
    a string (SmolLM2's, most text models') cannot render."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = "\n".join(
            media_marker if part.get("type") == "image_url" else str(part.get("text", "")) for part in content
        )
    return out


def _with_images(message: Any, i: int) -> Any:
    """A message for a vision model: text parts and ``image_url`` parts whose URL is a ``data:`` URL (the
    proxy fetches http(s) images itself and passes them as data; this worker never opens a URL), in user
    messages only (the handler reads images from those)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind != "image_url":
            raise InvalidRequest(
                f"messages[{i}] has a part of type {kind!r}; this model reads text and image_url parts",
                param="messages",
            )
        if message.get("role") != "user":
            raise InvalidRequest(f"messages[{i}]: images are read in user messages only", param="messages")
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url.startswith("data:"):
            raise InvalidRequest(f"messages[{i}]: an image_url must be a data: URL here", param="messages")
    return message
