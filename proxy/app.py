"""create_app(settings): routes, middleware, lifespan. Nothing here is a module-level singleton."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from proxy import rundirs
from proxy.api import admin, anthropic, images, ollama, openai, responses, speech, transcription
from proxy.api.common import Services
from proxy.api.errors import HANDLERS
from proxy.api.security import RequestGuard
from proxy.auth import KeyRing
from proxy.clock import Clock, SystemClock
from proxy.config import Settings
from proxy.manager import ModelManager, WorkerFactory

log = logging.getLogger("proxy")

# each API module brings its own routes (one module per dialect or kind of model)
ROUTE_MODULES = [openai, anthropic, responses, ollama, admin, transcription, speech, images]


def create_app(
    settings: Settings,
    *,
    keys: KeyRing | None = None,
    clock: Clock | None = None,
    worker_factory: WorkerFactory | None = None,
) -> Starlette:
    keyring = keys if keys is not None else KeyRing.load(settings.api_tokens, settings.jwt_secret)
    clock = clock or SystemClock()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        manager = ModelManager(settings, clock=clock, worker_factory=worker_factory)
        # TODO(manager): expose the runtime dir; it is the manager's (read here for the lock and the sweep)
        runtime_dir: Path = manager._runtime_dir
        lock = rundirs.hold(runtime_dir)
        rundirs.sweep(runtime_dir.parent, keep=runtime_dir)
        app.state.services = Services(settings=settings, manager=manager, keys=keyring, clock=clock)
        if keyring.open:
            where = settings.api_tokens or "api_tokens: null"
            log.warning("!!! no API keys in %s: the proxy is OPEN to anyone who can reach it !!!", where)
        names = ", ".join(c.name for c in settings.models) or "none"
        log.info("serving models: %s", names)
        try:
            yield
        finally:
            await manager.shutdown()
            os.close(lock)

    middleware = [Middleware(RequestGuard, settings=settings)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["*"],
                allow_headers=["*"],
                allow_credentials="*" not in settings.cors_origins,
            )
        )
    return Starlette(
        routes=[route for module in ROUTE_MODULES for route in module.routes],
        middleware=middleware,
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
