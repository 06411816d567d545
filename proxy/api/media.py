"""Images in a canonical chat request made into data URLs before the gate lets it pass to a worker:
every dialect's images end as OpenAI ``image_url`` parts (``proxy.dialects``), and here each becomes a
data URL labelled by its bytes: an http(s) URL fetched by the proxy's rules (``proxy.fetch``), a data URL
checked to hold an image. A worker only ever sees data URLs."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from proxy.api.common import services
from proxy.dialects.media import data_url, image_parts, scheme_of, typed_data_url
from proxy.errors import BadRequest
from proxy.fetch import Fetcher


def fetcher(request: Request) -> Fetcher:
    """The fetcher under the settings in force (a reload changes ``limits.fetch`` for the next request)."""
    return Fetcher(services(request).settings.fetch)


async def inline_images(body: dict[str, Any], fetch: Fetcher) -> None:
    """Each ``image_url`` part of ``body``'s messages as a typed data URL, in place (BadRequest, FetchFailed)."""
    for where, inner in list(image_parts(body)):
        url: str = inner["url"]
        scheme = scheme_of(url)
        if scheme == "data":
            inner["url"] = typed_data_url(url, where)
        elif scheme in ("http", "https"):
            got = await fetch.fetch(url, "image", param=where)
            inner["url"] = data_url(got.media_type, got.data)
        else:
            raise BadRequest(f"'{where}' must be an image as a data URL or an http(s) URL", param=where)
