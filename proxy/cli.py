"""The ``proxy`` command line: one click group, one function per subcommand.

``proxy`` with no subcommand (and ``python -m proxy``) serves, with the same options as ``proxy serve``.
``proxy token`` mints a JWT signed with the configured secret. Add a subcommand as a function decorated
with ``@main.command()``; read the configuration through ``_settings`` so errors read the same everywhere.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from proxy import __version__
from proxy.config import Settings
from proxy.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

DESCRIPTION = (
    "An OpenAI- and Ollama-compatible address for local models: each model starts in its own worker process on "
    "its first request and unloads when its keep_alive runs out."
)


def _config_option(function: F) -> F:
    return click.option("--config", default="config.yml", show_default=True, help="path to config.yml")(function)


def _serve_options(function: F) -> F:
    for option in reversed(
        [
            click.option("--host", default=None, help="address to listen on (default: server.host in config.yml)"),
            click.option(
                "--port", type=int, default=None, help="port to listen on (default: server.port in config.yml)"
            ),
            click.option("--log-level", default=None, help="debug, info, warning, error (default: log_level)"),
            click.option(
                "--watch",
                is_flag=True,
                help="reload the configuration when its files change (SIGHUP always does)",
            ),
        ]
    ):
        function = option(function)
    return _config_option(function)


def _settings(config: str, **overrides: Any) -> Settings:
    """config.yml and the model configs; a ConfigError is one line on stderr and exit status 2."""
    from proxy.config import load_settings

    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None


@click.group(invoke_without_command=True, help=DESCRIPTION, context_settings={"help_option_names": ["-h", "--help"]})
@_serve_options
@click.version_option(__version__, prog_name="proxy")
@click.pass_context
def main(
    ctx: click.Context, config: str, host: str | None, port: int | None, log_level: str | None, watch: bool
) -> None:
    if ctx.invoked_subcommand is None:
        run_server(config, host, port, log_level, watch)


@main.command()
@_serve_options
def serve(config: str, host: str | None, port: int | None, log_level: str | None, watch: bool) -> None:
    """Serve (what `proxy` with no subcommand does). SIGHUP reloads the configuration; so does a saved file
    with --watch."""
    run_server(config, host, port, log_level, watch)


def run_server(config: str, host: str | None, port: int | None, log_level: str | None, watch: bool = False) -> None:
    from proxy.auth import KeyRing

    settings = _settings(config, host=host, port=port)
    try:
        keys = KeyRing.load(settings.api_tokens, settings.jwt_secret)
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None
    level = (log_level or settings.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from proxy.app import create_app
    from proxy.connections import bounded, raise_fd_limit
    from proxy.reload import ReloadFrom
    from proxy.ticks import QuietServer

    reload = ReloadFrom(Path(config), {"host": host, "port": port}, watch=watch)
    app = create_app(settings, keys=keys, reload=reload)
    if settings.max_connections:
        raise_fd_limit(settings.max_connections)
    # what was made so far (the modules, the app) lives as long as the process: out of the cyclic GC's sight, so
    # the collections that a streamed token's few allocations trigger now and then do not walk it all again
    gc.collect()
    gc.freeze()
    served = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=bounded(settings.header_timeout, settings.max_connections),  # proxy/connections.py
        log_level=level.lower(),
        access_log=level == "DEBUG",
        timeout_graceful_shutdown=5,
    )
    server = QuietServer(served)  # wakes once a second when idle, not ten times (proxy/ticks.py)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run()
    if not server.started:  # as uvicorn.run: it could not start (the port is taken, the lifespan failed)
        raise SystemExit(3)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TTL = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_ttl(text: str) -> float:
    """``3600``, ``90m``, ``1d``, ``1w2d``, ``1h30m`` -> seconds (positive)."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pieces = _TTL.findall(text)
        if not pieces or "".join(n + u for n, u in pieces) != text:
            raise click.BadParameter(f"'{text}' is not a duration (3600, 90m, 12h, 1d, 1w)") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in pieces)
    if not seconds > 0:
        raise click.BadParameter("must be longer than 0")
    return seconds


@main.command()
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@click.option("--ttl", default="1d", show_default=True, help="how long it is valid: 3600, 90m, 12h, 1d, 1w")
@click.option("--models", default=None, help="comma-separated model names it may see (default: every model)")
@_config_option
def token(role: str, ttl: str, models: str | None, config: str) -> None:
    """Print a JWT signed with auth.jwt_secret (or SECRET_KEY), for Authorization: Bearer."""
    from proxy.auth import MIN_SECRET_BYTES, mint_token

    seconds = parse_ttl(ttl)
    settings = _settings(config)
    secret = settings.jwt_secret
    if not secret:
        raise click.ClickException(f"no JWT secret: set auth.jwt_secret in {config} or the SECRET_KEY variable")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise click.ClickException(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
    scope: list[str] | None = None
    if models is not None:
        scope = [m.strip() for m in models.split(",") if m.strip()]
        known = {n for cfg in settings.models for n in (cfg.name, *cfg.aliases)}
        unknown = [m for m in scope if m not in known]
        if unknown:
            raise click.ClickException(f"no such model in {config}: {', '.join(unknown)}")
    click.echo(mint_token(secret, role, seconds, scope))


def _register_client_commands() -> None:
    from proxy.cli_ops import register

    register(main)


_register_client_commands()  # proxy ps, models, load, unload, logs (proxy/cli_ops.py)
