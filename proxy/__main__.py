"""``python -m proxy`` / ``proxy``: read the configuration and serve."""

from __future__ import annotations

import argparse
import logging
import sys

from proxy import __version__
from proxy.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="proxy",
        description="An OpenAI- and Ollama-compatible address for local models: each model starts in its own "
        "worker process on its first request and unloads when its keep_alive runs out.",
    )
    parser.add_argument("--config", default="config.yml", help="path to config.yml (default: %(default)s)")
    parser.add_argument("--host", help="address to listen on (default: server.host in config.yml)")
    parser.add_argument("--port", type=int, help="port to listen on (default: server.port in config.yml)")
    parser.add_argument("--log-level", help="debug, info, warning, error (default: log_level in config.yml)")
    parser.add_argument("--watch", action="store_true", help="reload the configuration when its files change")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)

    from proxy.auth import KeyRing
    from proxy.config import load_settings

    try:
        settings = load_settings(args.config, host=args.host, port=args.port)
        keys = KeyRing.load(settings.api_tokens)
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None
    level = (args.log_level or settings.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pathlib import Path

    import uvicorn

    from proxy.app import create_app
    from proxy.reload import ReloadFrom

    overrides = {"host": args.host, "port": args.port}
    app = create_app(settings, keys=keys, reload=ReloadFrom(Path(args.config), overrides, watch=args.watch))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=level.lower(),
        access_log=level == "DEBUG",
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
