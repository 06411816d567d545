"""The request and response bodies the OpenAPI document describes, as typed dicts.

msgspec turns them into JSON Schema (``msgspec.json.schema_components``), so the document is built
from types rather than written by hand. The routes check their bodies by hand (``proxy.dialects``,
with clear 400s); these types say what those checks accept: the fields a route reads, their types,
required ones as required. Bodies may carry more fields (clients send their dialect's whole request),
so no schema here forbids extra keys. Where a route's own checks and a type here disagree, the
route is right and this file is the one to fix. Standard library and msgspec only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, TypedDict

from msgspec import Meta

from proxy.wire import AudioFormat

# keep_alive in every dialect: seconds, a Go duration ("5m", "-1"), 0 to unload, negative to pin
KeepAlive = Annotated[
    float | str | None,
    Meta(description="seconds, a duration such as '5m' or '1h30m', 0 to unload when idle, negative to pin"),
]
Text = Annotated[str, Meta(min_length=1)]

# -- errors, one shape per dialect (proxy/api/errors.py) -------------------------------------------


class OpenAIErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | int | None


class OpenAIError(TypedDict):
    """The error body of OpenAI's dialect and of the proxy's own routes."""

    error: OpenAIErrorDetail


class OllamaError(TypedDict):
    """The error body under ``/api/``."""

    error: str


class AnthropicErrorDetail(TypedDict):
    type: str
    message: str


class AnthropicError(TypedDict):
    """The error body under ``/v1/messages``."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# -- OpenAI ------------------------------------------------------------------------------------------


class ChatMessage(TypedDict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: NotRequired[str | list[dict[str, Any]] | None]
    name: NotRequired[str]
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]


class ChatCompletionRequest(TypedDict):
    model: Text
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    stream: NotRequired[bool]
    max_tokens: NotRequired[int | None]
    max_completion_tokens: NotRequired[int | None]
    temperature: NotRequired[float]
    top_p: NotRequired[float]
    stop: NotRequired[str | list[str] | None]
    seed: NotRequired[int]
    tools: NotRequired[list[dict[str, Any]]]
    tool_choice: NotRequired[str | dict[str, Any]]
    response_format: NotRequired[dict[str, Any]]
    keep_alive: NotRequired[KeepAlive]


class CompletionRequest(TypedDict):
    model: Text
    prompt: str | list[str]
    stream: NotRequired[bool]
    max_tokens: NotRequired[int | None]
    temperature: NotRequired[float]
    stop: NotRequired[str | list[str] | None]
    keep_alive: NotRequired[KeepAlive]


class EmbeddingRequest(TypedDict):
    model: Text
    input: str | list[str]
    encoding_format: NotRequired[Literal["float", "base64"]]
    keep_alive: NotRequired[KeepAlive]


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    finish_reason: str | None


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: NotRequired[Usage]


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]


class SpeechBody(TypedDict):
    """``POST /v1/audio/speech``"""

    model: Text
    input: Text
    voice: NotRequired[str]
    response_format: NotRequired[AudioFormat]
    speed: NotRequired[Annotated[float, Meta(ge=0.25, le=4.0)]]
    language: NotRequired[str]
    speaker_wav: NotRequired[str]
    keep_alive: NotRequired[KeepAlive]


class TranscriptionForm(TypedDict):
    """``POST /v1/audio/transcriptions`` and ``/translations`` (multipart)"""

    file: Annotated[
        str, Meta(description="the audio (wav, mp3, flac, ogg, ...)", extra_json_schema={"format": "binary"})
    ]
    model: Text
    language: NotRequired[str]
    prompt: NotRequired[str]
    temperature: NotRequired[str]
    response_format: NotRequired[Literal["json", "text", "srt", "vtt", "verbose_json"]]


class ImageGenerationRequest(TypedDict):
    """``POST /v1/images/generations``"""

    prompt: Text
    model: NotRequired[str]
    n: NotRequired[int]
    size: NotRequired[str]
    response_format: NotRequired[Literal["b64_json", "url"]]
    seed: NotRequired[int]
    keep_alive: NotRequired[KeepAlive]


# -- Anthropic and Responses ---------------------------------------------------------------------------


class AnthropicMessage(TypedDict):
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class MessagesRequest(TypedDict):
    """``POST /v1/messages``"""

    model: Text
    max_tokens: int
    messages: Annotated[list[AnthropicMessage], Meta(min_length=1)]
    system: NotRequired[str | list[dict[str, Any]]]
    stream: NotRequired[bool]
    stop_sequences: NotRequired[list[str]]
    temperature: NotRequired[float]
    tools: NotRequired[list[dict[str, Any]]]
    tool_choice: NotRequired[dict[str, Any]]
    thinking: NotRequired[dict[str, Any]]
    output_config: NotRequired[dict[str, Any]]
    metadata: NotRequired[dict[str, Any]]


class CountTokensRequest(TypedDict):
    """``POST /v1/messages/count_tokens``"""

    model: Text
    messages: Annotated[list[AnthropicMessage], Meta(min_length=1)]
    system: NotRequired[str | list[dict[str, Any]]]
    tools: NotRequired[list[dict[str, Any]]]


class ResponsesRequest(TypedDict):
    """``POST /v1/responses``"""

    model: Text
    input: str | list[dict[str, Any]]
    instructions: NotRequired[str]
    stream: NotRequired[bool]
    max_output_tokens: NotRequired[int]
    temperature: NotRequired[float]
    top_p: NotRequired[float]
    tools: NotRequired[list[dict[str, Any]]]
    tool_choice: NotRequired[str | dict[str, Any]]
    text: NotRequired[dict[str, Any]]


# -- Ollama ------------------------------------------------------------------------------------------


class OllamaMessage(TypedDict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: NotRequired[list[str]]
    tool_calls: NotRequired[list[dict[str, Any]]]


class OllamaChatRequest(TypedDict):
    """``POST /api/chat``; no messages loads the model (keep_alive 0: unloads it)"""

    model: Text
    messages: NotRequired[list[OllamaMessage]]
    stream: NotRequired[bool]
    format: NotRequired[str | dict[str, Any]]
    options: NotRequired[dict[str, Any]]
    tools: NotRequired[list[dict[str, Any]]]
    keep_alive: NotRequired[KeepAlive]


class OllamaGenerateRequest(TypedDict):
    """``POST /api/generate``; no prompt loads the model (keep_alive 0: unloads it)"""

    model: Text
    prompt: NotRequired[str]
    system: NotRequired[str]
    raw: NotRequired[bool]
    stream: NotRequired[bool]
    format: NotRequired[str | dict[str, Any]]
    images: NotRequired[list[str]]
    options: NotRequired[dict[str, Any]]
    keep_alive: NotRequired[KeepAlive]


class OllamaEmbedRequest(TypedDict):
    """``POST /api/embed``"""

    model: Text
    input: str | list[str]
    keep_alive: NotRequired[KeepAlive]


class OllamaEmbeddingsRequest(TypedDict):
    """``POST /api/embeddings`` (the older one)"""

    model: Text
    prompt: str
    keep_alive: NotRequired[KeepAlive]


class OllamaShowRequest(TypedDict, total=False):
    """``POST /api/show``: ``model`` (or the older ``name``)"""

    model: str
    name: str


class OllamaPullRequest(TypedDict, total=False):
    """``POST /api/pull``: succeeds for a model installed here (Ollama's progress lines), 404 otherwise"""

    model: str
    name: str
    stream: bool


class OllamaModelRef(TypedDict, total=False):
    """``DELETE /api/delete``: ``model`` (or ``name``); answered 403 (models are removed by their config)"""

    model: str
    name: str


class OllamaCopyRequest(TypedDict):
    """``POST /api/copy``: answered 403 (a new name is an alias in the model's config)"""

    source: Text
    destination: Text


class TtsRequest(TypedDict):
    """``POST /api/tts``"""

    model: Text
    text: Text
    voice: NotRequired[str]
    format: NotRequired[AudioFormat]
    speed: NotRequired[Annotated[float, Meta(ge=0.25, le=4.0)]]
    language: NotRequired[str]
    speaker_wav: NotRequired[str]
    keep_alive: NotRequired[KeepAlive]


# -- images: the inference API, AUTOMATIC1111's, seed 001's ------------------------------------------


class InferenceImageRequest(TypedDict):
    """``POST /txt2img``, ``/img2img`` (with ``init_image``)"""

    model: Text
    prompt: Text
    negative_prompt: NotRequired[str]
    num_inference_steps: NotRequired[int]
    guidance_scale: NotRequired[float]
    width: NotRequired[int]
    height: NotRequired[int]
    seed: NotRequired[int]
    num_images: NotRequired[int]
    scheduler: NotRequired[str]
    init_image: NotRequired[str]
    strength: NotRequired[float]
    keep_alive: NotRequired[KeepAlive]


class A1111Request(TypedDict):
    """``POST /sdapi/v1/txt2img``, ``/img2img`` (with ``init_images``)"""

    prompt: Text
    negative_prompt: NotRequired[str]
    steps: NotRequired[int]
    cfg_scale: NotRequired[float]
    width: NotRequired[int]
    height: NotRequired[int]
    seed: NotRequired[int]
    batch_size: NotRequired[int]
    sampler_name: NotRequired[str]
    init_images: NotRequired[list[str]]
    denoising_strength: NotRequired[float]
    override_settings: NotRequired[dict[str, Any]]


class A1111Options(TypedDict, total=False):
    """``/sdapi/v1/options``: the selected checkpoint, used by requests that name no model"""

    sd_model_checkpoint: str


class InferRequest(TypedDict):
    """Seed 001's ``POST /infer``"""

    model_id: Text
    prompt: Text
    id: NotRequired[Annotated[str, Meta(min_length=1, max_length=200)]]
    negative_prompt: NotRequired[str]
    num_inference_steps: NotRequired[int]
    guidance_scale: NotRequired[Annotated[float, Meta(ge=1.0, le=20.0)]]
    width: NotRequired[Annotated[int, Meta(ge=256, le=1024)]]
    height: NotRequired[Annotated[int, Meta(ge=256, le=1024)]]
    seed: NotRequired[int]
    num_images: NotRequired[int]
    keep_alive: NotRequired[KeepAlive]


class JobRequest(TypedDict):
    """RunPod's ``/v2/{model}/run`` and ``/runsync``: ``input`` is the body of the model's usual route"""

    input: dict[str, Any]


class ServiceInput(TypedDict):
    """One of three shapes: ``image_url`` (+ ``prompt``) describes an image on a vision model;
    ``image_description`` (+ ``prompt``) writes a product's title, description, keywords and categories on a
    chat model; ``text`` (+ ``voice``, ``audio_prompt_url``: a voice sample to clone) speaks on a speech model"""

    image_url: NotRequired[str]
    image_description: NotRequired[str]
    prompt: NotRequired[str]
    max_tokens: NotRequired[int]
    temperature: NotRequired[float]
    text: NotRequired[str]
    voice: NotRequired[str]
    language: NotRequired[str]
    audio_prompt_url: NotRequired[str]


class ServiceRequest(TypedDict):
    """The seed's ``/api/v1/run`` and ``/runsync``"""

    model: str
    input: ServiceInput


class Job(TypedDict):
    id: str
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
    output: NotRequired[Any]
    error: NotRequired[str]


class ListedJob(Job):
    model: str
    created: float  # seconds since the epoch
    owner: NotRequired[str]  # admins only: the sha256 of the key that made it


class JobList(TypedDict):
    jobs: list[ListedJob]


class PurgedQueue(TypedDict):
    removed: int
    status: Literal["completed"]


# -- the proxy's own ---------------------------------------------------------------------------------


class ModelState(TypedDict):
    name: str
    state: Literal["stopped", "starting", "ready", "stopping", "failed"]
    backend: str
    kind: str
    pid: int | None
    in_flight: int
    keep_alive: str | None
    last_error: str | None


class Status(TypedDict):
    """``GET /status``"""

    models: list[ModelState]
    queued: int
    max_loaded_models: int | None
    memory: dict[str, Any]


class Loaded(TypedDict):
    loaded: str


class Unloaded(TypedDict):
    unloaded: list[str]


class Health(TypedDict):
    status: str


class RouterUnload(TypedDict):
    """llama.cpp's router API: ``POST /models/unload``"""

    model: Text


class RouterUnloaded(TypedDict):
    success: bool


# the types whose schemas go under components/schemas
COMPONENTS: tuple[type, ...] = (
    OpenAIError,
    OllamaError,
    AnthropicError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ChatCompletion,
    ModelList,
    Model,
    SpeechBody,
    TranscriptionForm,
    ImageGenerationRequest,
    MessagesRequest,
    CountTokensRequest,
    ResponsesRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaEmbedRequest,
    OllamaEmbeddingsRequest,
    OllamaShowRequest,
    OllamaPullRequest,
    OllamaModelRef,
    OllamaCopyRequest,
    TtsRequest,
    InferenceImageRequest,
    A1111Request,
    A1111Options,
    InferRequest,
    JobRequest,
    ServiceRequest,
    Job,
    JobList,
    PurgedQueue,
    Status,
    Loaded,
    Unloaded,
    Health,
    RouterUnload,
    RouterUnloaded,
)
