"""The CLI's client commands: ``proxy ps``, ``models``, ``load``, ``unload``, ``logs``, talking to a running
proxy over HTTP (httpx), as ``ollama ps`` and ``ollama stop`` do.

The address is ``--url``, else config.yml's ``server.host`` and ``server.port``; the key is ``--key`` or
``PROXY_API_KEY``. A refusal prints the server's reason in one line and exits 1; no proxy at the address
prints ``no proxy at URL`` and exits 1. ``register(group)`` adds the commands to the ``proxy`` group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import click
import yaml

if TYPE_CHECKING:  # imported where used: httpx pulls in rich and pygments, which the serving proxy never needs
    import httpx

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11434
_ANY_ADDRESS = {"0.0.0.0", "::", "[::]", ""}


def default_url(config: str) -> str:
    """http://host:port from config.yml's server section (what the proxy listens on); the defaults when
    the file is missing or unreadable (only the address is read, so a broken model config does not matter)."""
    server: Any = {}
    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        server = data.get("server") or {} if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        pass
    server = server if isinstance(server, dict) else {}
    host = str(server.get("host") or DEFAULT_HOST)
    port = server.get("port") or DEFAULT_PORT
    if host in _ANY_ADDRESS:
        host = DEFAULT_HOST  # listening on every address: reach it on loopback
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Proxy:
    """A running proxy, reached over HTTP. Errors become ``click.ClickException`` (exit status 1)."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # no read timeout: a load can take minutes, and logs -f streams until stopped
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=None))

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError:
            raise click.ClickException(f"no proxy at {self.url}") from None
        self.check(response)
        try:
            return response.json()
        except ValueError:  # something else answers at that address (a web server, another API)
            raise click.ClickException(
                f"{self.url} answered {path} with something other than JSON: not this proxy?"
            ) from None

    def check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()
        raise click.ClickException(f"{response.status_code} {response.reason_phrase}: {reason(response)}")

    def stream_lines(self, path: str, **kw: Any) -> Iterator[str]:
        import httpx

        try:
            with self.http.stream("GET", path, **kw) as response:
                self.check(response)
                yield from response.iter_lines()
        except httpx.TransportError:
            raise click.ClickException(f"no proxy at {self.url}") from None


def reason(response: httpx.Response) -> str:
    """The server's reason from an error body in any of the proxy's dialects, on one line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    text = str(error) if error else response.text.strip() or response.reason_phrase
    return " ".join(text.split())


def size(n: int | None) -> str:
    """Bytes as ollama shows them (decimal units): 123 MB, 4.2 GB."""
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit in ("B", "KB", "MB") else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def until(expires_at: float | str | None, now: float) -> str:
    """When a loaded model unloads, as ollama says it: "4 minutes from now", "Forever"."""
    if expires_at == "never" or (isinstance(expires_at, float | int) and math.isinf(expires_at)):
        return "Forever"
    if not isinstance(expires_at, float | int):
        return "-"
    left = expires_at - now
    if left < 1:
        return "Less than a second from now" if left >= 0 else "now"
    for seconds, name in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if left >= seconds:
            count = int(left // seconds)
            return f"{count} {name}{'s' if count != 1 else ''} from now"
    return "now"  # pragma: no cover  (left >= 1 always matches "second")


def processor(model: dict[str, Any]) -> str:
    device = model.get("device")
    if not device:
        return "-"
    if str(device).startswith("cuda"):
        return f"GPU {str(device).partition(':')[2] or 0}"
    return str(device).upper()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _client_options(function: F) -> F:
    function = click.option(
        "--key", envvar="PROXY_API_KEY", default=None, help="API key (default: the PROXY_API_KEY variable)"
    )(function)
    function = click.option("--url", default=None, help="the proxy's address (default: server.* in --config)")(function)
    return click.option("--config", default="config.yml", show_default=True, help="config.yml, for the address")(
        function
    )


def _proxy(url: str | None, key: str | None, config: str) -> Proxy:
    return Proxy(url or default_url(config), key)


@click.command()
@_client_options
def ps(url: str | None, key: str | None, config: str) -> None:
    """The models loaded now (like ollama ps): name, state, memory, where, until."""
    proxy = _proxy(url, key, config)
    try:
        models = proxy.call("GET", "/status")["models"]
    finally:
        proxy.close()
    now = time.time()
    rows = [
        [
            m["name"],
            m["state"],
            size((m.get("memory_bytes") or 0) + (m.get("vram_bytes") or 0)),
            processor(m),
            until(m.get("expires_at"), now),
        ]
        for m in models
        if m["state"] != "stopped" and m["state"] != "failed"
    ]
    click.echo(table(["NAME", "STATE", "SIZE", "PROCESSOR", "UNTIL"], rows))


@click.command()
@_client_options
def models(url: str | None, key: str | None, config: str) -> None:
    """Every model the proxy serves: name, backend, kind, state."""
    proxy = _proxy(url, key, config)
    try:
        found = proxy.call("GET", "/status")["models"]
    finally:
        proxy.close()
    rows = [[m["name"], m["backend"], m.get("kind") or "-", m["state"]] for m in found]
    click.echo(table(["NAME", "BACKEND", "KIND", "STATE"], rows))


@click.command()
@click.argument("model")
@click.option("--keep-alive", default=None, help="how long it stays loaded: 5m, 1h, -1 for ever (admin key)")
@_client_options
def load(model: str, keep_alive: str | None, url: str | None, key: str | None, config: str) -> None:
    """Load MODEL now (admin key); returns when it is ready."""
    proxy = _proxy(url, key, config)
    params = {"keep_alive": keep_alive} if keep_alive is not None else {}
    try:
        done = proxy.call("POST", f"/load/{quote(model, safe=':')}", params=params)
    finally:
        proxy.close()
    click.echo(f"loaded {done['loaded']}")


@click.command()
@click.argument("model", required=False)
@_client_options
def unload(model: str | None, url: str | None, key: str | None, config: str) -> None:
    """Unload MODEL, or every loaded model when none is named (admin key); waits for requests in flight."""
    proxy = _proxy(url, key, config)
    path = f"/unload/{quote(model, safe=':')}" if model else "/unload"
    try:
        names = proxy.call("POST", path)["unloaded"]
    finally:
        proxy.close()
    if names:
        click.echo(f"unloaded {', '.join(names)}")
    else:
        click.echo(f"{model} was not loaded" if model else "nothing was loaded")


@click.command()
@click.argument("model")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines until interrupted")
@click.option("-n", "--lines", type=int, default=None, help="how many of the last lines (default: the server's)")
@_client_options
def logs(model: str, follow: bool, lines: int | None, url: str | None, key: str | None, config: str) -> None:
    """The tail of MODEL's worker log (admin key); -f follows it."""
    proxy = _proxy(url, key, config)
    params: dict[str, str | int] = {"follow": "true"} if follow else {}
    if lines is not None:
        params["lines"] = lines
    try:
        for line in proxy.stream_lines(f"/logs/{quote(model, safe=':')}", params=params):
            click.echo(line)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()


COMMANDS = [ps, models, load, unload, logs]


def register(group: click.Group) -> None:
    """Add the client commands to the ``proxy`` command group."""
    for command in COMMANDS:
        group.add_command(command)
