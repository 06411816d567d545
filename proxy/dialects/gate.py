"""The one gate every generation and embedding request passes, whatever its dialect. Pure functions.

Every dialect (OpenAI, Ollama, Anthropic, Responses; a job runs the OpenAI routes) first translates its
request to the canonical one, the OpenAI chat or completion body that workers take, then calls
``check_chat`` on it before anything is leased or loaded: the messages' shape and roles (a completion: its
prompt), images only for a vision model (theirs checked from their headers: ``proxy.dialects.vision``),
the sampling fields' types, and the bounds on every JSON schema that becomes a grammar
(``proxy.dialects.schemas``: repetitions, enums, total size), wherever the dialect carried it
(``response_format``, Ollama's ``format``, Anthropic's ``output_config.format`` and ``input_schema``,
the Responses API's ``text.format``, and the ``parameters`` of the tools a request forces:
``_forced``). A refusal names
the field as the client spelled it (``SPELLINGS``). Embeddings pass ``check_embeddings``: the inputs' shape,
their count and their estimated tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.config import ModelConfig, Settings
from proxy.dialects.schemas import SchemaLimits, check_schemas
from proxy.dialects.shaping import check_common, check_embedding_input, check_messages, check_prompt
from proxy.dialects.vision import LLAMA_FORMATS, check_images
from proxy.errors import BadRequest

Dialect = Literal["openai", "ollama", "anthropic", "responses"]


@dataclass(frozen=True)
class Spelling:
    """How a dialect names the canonical request's schema-carrying fields in its own requests."""

    response_format: str
    tool: str  # formatted with i (the tool's index) and name (its function's name)


SPELLINGS: Mapping[Dialect, Spelling] = {
    "openai": Spelling("response_format", "tools[{i}].function.parameters"),
    "ollama": Spelling("format", "tools[{i}].function.parameters"),
    "anthropic": Spelling("output_config.format", "tools[{i}].input_schema"),
    # the Responses API's non-function tools are left out in translation, so its tools go by name
    "responses": Spelling("text.format", "tools (function '{name}').parameters"),
}


@dataclass(frozen=True)
class Limits:
    """What ``config.yml``'s ``limits`` bound in a request."""

    schemas: SchemaLimits = field(default_factory=SchemaLimits)
    embedding_inputs: int = 2048  # limits.max_embedding_inputs
    embedding_tokens: int = 300_000  # limits.max_embedding_tokens, estimated by estimated_tokens
    image_pixels: int = 4096 * 4096  # limits.max_image_pixels: an image's size, read from its header

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            SchemaLimits(settings.max_schema_repeat, settings.max_schema_enum, settings.max_schema_bytes),
            settings.max_embedding_inputs,
            settings.max_embedding_tokens,
            settings.max_image_pixels,
        )


def schemas_of(request: Mapping[str, Any], dialect: Dialect = "openai") -> list[tuple[str, Any]]:
    """Every JSON schema in a canonical request that the worker turns into a grammar, with its field's name."""
    spelling = SPELLINGS[dialect]
    out: list[tuple[str, Any]] = []
    response_format = request.get("response_format")
    if isinstance(response_format, dict):
        # OpenAI's json_schema.schema; llama-cpp-python's own json_object + schema
        inner = response_format.get("json_schema")
        if isinstance(inner, dict) and "schema" in inner:
            out.append((spelling.response_format, inner["schema"]))
        if "schema" in response_format:
            out.append((spelling.response_format, response_format["schema"]))
    forced = _forced(request)
    tools = request.get("tools")
    if isinstance(tools, list) and forced is not None:
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and "parameters" in function and forced in (True, function.get("name")):
                out.append((spelling.tool.format(i=i, name=function.get("name")), function["parameters"]))
    functions = request.get("functions")  # OpenAI's older tools, which llama-cpp-python still takes
    if isinstance(functions, list) and forced is not None:
        for i, function in enumerate(functions):
            if isinstance(function, dict) and "parameters" in function and forced in (True, function.get("name")):
                out.append((f"functions[{i}].parameters", function["parameters"]))
    return out


def _forced(request: Mapping[str, Any]) -> str | bool | None:
    """Which tools' schemas become a grammar: the one a request forces by name (``tool_choice`` naming a
    function, or the older ``function_call``), every one (``required``: a server may constrain the call to
    any of them), or none (``auto``, ``none``, absent: the schemas are only text in the prompt). Agents send
    tools whose schemas a grammar could never hold (Claude Code's ``maxLength: 524288``) and never force them."""
    for choice in (request.get("tool_choice"), request.get("function_call")):
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else choice.get("name")
            return name if isinstance(name, str) else True
        if choice == "required":
            return True
    return None


def check_chat(
    request: dict[str, Any], cfg: ModelConfig, limits: Limits, dialect: Dialect = "openai", *, completion: bool = False
) -> None:
    """A canonical chat request (its ``messages``) or, with ``completion``, a completion (its ``prompt``),
    checked whole: BadRequest (400; UnsupportedInput for images a model cannot read) naming the field. A
    completion's one-string prompt array becomes that string."""
    if completion:
        check_prompt(request)
    else:
        check_messages(request.get("messages"), cfg)
        if cfg.vision:  # llama.cpp decodes PNG, JPEG, GIF, BMP; an external server may take more
            formats = LLAMA_FORMATS if cfg.backend == "llama_cpp" else None
            check_images(request.get("messages"), limits.image_pixels, formats)
    check_common(request)
    schemas = schemas_of(request, dialect)
    if schemas:
        check_schemas(schemas, limits.schemas)


def estimated_tokens(texts: list[str]) -> int:
    """Tokens in ``texts``, counted cheaply: their UTF-8 bytes / 4 (about a token for English text; a
    token is at least one byte, so never more than 4x under)."""
    return math.ceil(sum(len(text.encode()) for text in texts) / 4)


def check_embeddings(value: Any, limits: Limits, key: str = "input") -> list[str]:
    """What to embed: a string or a non-empty array of non-empty strings, at most
    ``limits.max_embedding_inputs`` of them and ``limits.max_embedding_tokens`` (estimated) in all."""
    if isinstance(value, list) and len(value) > limits.embedding_inputs:
        raise BadRequest(
            f"'{key}' holds {len(value)} inputs, over the limit of {limits.embedding_inputs} a request "
            "(limits.max_embedding_inputs); send them in several requests",
            param=key,
        )
    inputs = check_embedding_input(value, key)
    tokens = estimated_tokens(inputs)
    if tokens > limits.embedding_tokens:
        raise BadRequest(
            f"'{key}' holds about {tokens} tokens (UTF-8 bytes / 4), over the limit of {limits.embedding_tokens} "
            "a request (limits.max_embedding_tokens); send them in several requests",
            param=key,
        )
    return inputs
