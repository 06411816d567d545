"""Images in a canonical chat request made into data URLs before the gate: every dialect's images end as
OpenAI ``image_url`` parts (``proxy.dialects``), and here, for a vision model, each becomes a data URL
labelled by its bytes: an http(s) URL fetched by the proxy's rules (``proxy.fetch``), a data URL relabelled
(Ollama's images all come as PNG). The gate then checks them all as data URLs (``proxy.dialects.vision``:
format, pixel size), so a worker only ever sees checked data URLs. A model without vision fetches nothing:
the gate refuses its images."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from proxy.api.common import services
from proxy.config import ModelConfig
from proxy.dialects.media import data_url, image_parts, relabelled, scheme_of
from proxy.fetch import Fetcher


def fetcher(request: Request) -> Fetcher:
    """The fetcher under the settings in force (a reload changes ``limits.fetch`` for the next request)."""
    return Fetcher(services(request).settings.fetch)


async def inline_images(body: dict[str, Any], cfg: ModelConfig, fetch: Fetcher) -> None:
    """Each ``image_url`` part of a vision model's request as a data URL, in place (FetchFailed); any other
    URL is left for the gate to refuse."""
    if not cfg.vision:
        return
    for where, inner in list(image_parts(body)):
        url: str = inner["url"]
        scheme = scheme_of(url)
        if scheme == "data":
            inner["url"] = relabelled(url)
        elif scheme in ("http", "https"):
            got = await fetch.fetch(url, "image", param=where)
            inner["url"] = data_url(got.media_type, got.data)
