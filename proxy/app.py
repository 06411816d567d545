"""create_app(settings): routes, middleware, lifespan. Nothing here is a module-level singleton."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from proxy import rundirs
from proxy.api import (
    admin,
    anthropic,
    cluster,
    images,
    infer,
    jobs,
    ollama,
    ollama_models,
    openai,
    openapi,
    ops,
    responses,
    service,
    speech,
    transcription,
    ui,
)
from proxy.api.common import Services
from proxy.api.errors import HANDLERS
from proxy.api.forwarding import ClusterHeaders
from proxy.api.observe import RequestEvents
from proxy.api.perkey import PerKeyLimit
from proxy.api.security import RequestGuard
from proxy.auth import KeyRing
from proxy.clock import Clock, SystemClock
from proxy.cluster.net import ClusterNet
from proxy.config import ModelConfig, Settings
from proxy.digests import Digests
from proxy.discovery import Discovery
from proxy.events import Event, EventBus, LoadEnded, StateChanged, Unloaded
from proxy.jobs import Jobs, JobStore
from proxy.manager import ModelManager
from proxy.metrics import Metrics
from proxy.modellogs import LogBook
from proxy.reload import Reloader, ReloadFrom
from proxy.runtime import WorkerFactory, WorkerHandle
from proxy.spares import Spares
from proxy.supervisor import Worker

log = logging.getLogger("proxy")

# each API module brings its own routes (one module per dialect or kind of model)
ROUTE_MODULES = [
    openai,
    cluster,
    anthropic,
    responses,
    service,  # /api/v1/run: before Ollama's /api/* routes
    ollama,
    ollama_models,
    admin,
    ops,
    transcription,
    speech,
    images,
    infer,
    jobs,
    ui,
    openapi,
]


def create_app(
    settings: Settings,
    *,
    keys: KeyRing | None = None,
    clock: Clock | None = None,
    worker_factory: WorkerFactory | None = None,
    reload: ReloadFrom | None = None,
) -> Starlette:
    keyring = keys if keys is not None else KeyRing.load(settings.api_tokens, settings.jwt_secret)
    clock = clock or SystemClock()
    bus = EventBus()
    metrics = Metrics(bus, settings.models_dir / ".cache" / "prompts")
    logbook = LogBook(settings.log_dir, settings.log_file_bytes)
    spares = Spares() if settings.warm_spare and worker_factory is None else None

    def worker(cfg: ModelConfig, runtime_dir: Path, on_exit: Callable[[WorkerHandle], None]) -> WorkerHandle:
        return Worker(cfg, runtime_dir, on_exit, logs=logbook.model(cfg.name), spares=spares)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        digests = Digests(settings.models_dir / ".cache" / "digests.json")  # /api/pull and content ids
        discovery = Discovery(settings, settings.models, digests)
        catalog = dataclasses.replace(settings, models=tuple(discovery.scan_now()))
        manager = ModelManager(catalog, clock=clock, worker_factory=worker_factory or worker, events=bus, spares=spares)
        metrics.watch(manager.status)
        cluster = await _join_cluster(settings, manager, clock, bus, metrics) if settings.cluster is not None else None
        discovery.hash_soon(manager)
        app.state.discovery = discovery
        store = JobStore(settings.data_dir / "jobs.sqlite3" if settings.data_dir is not None else None)
        app.state.jobs = queue = Jobs(
            store,
            jobs.executor(app, manager.resolve),
            clock,
            parallel_of=lambda name: manager.resolve(name).parallel,
            max_queued=settings.jobs_max_queued,
            ttl=settings.jobs_ttl,
            max_queued_per_key=settings.jobs_max_queued_per_key,
            max_bytes_per_key=settings.jobs_max_bytes_per_key,
            node=settings.cluster.node if settings.cluster is not None else None,
        )
        discovery.on_catalog.append(queue.forget_missing)  # a reload or rescan that removes a model ends its jobs
        # TODO(manager): expose the runtime dir; it is the manager's (read here for the lock and the sweep)
        runtime_dir: Path = manager._runtime_dir
        lock = rundirs.hold(runtime_dir)
        rundirs.sweep(runtime_dir.parent, keep=runtime_dir)
        app.state.services = Services(
            settings=catalog,
            manager=manager,
            keys=keyring,
            clock=clock,
            events=bus,
            metrics=metrics,
            logs=logbook,
            digests=digests,
            cluster=cluster[1] if cluster is not None else None,
        )
        if keyring.open:
            where = settings.api_tokens or "api_tokens: null"
            log.warning("!!! no API keys in %s: the proxy is OPEN to anyone who can reach it !!!", where)
        names = ", ".join(c.name for c in catalog.models) or "none"
        log.info("serving models: %s", names)
        reloader: Reloader | None = None
        if reload is not None:

            def install(new: Settings, keys: KeyRing) -> None:
                app.state.services = dataclasses.replace(app.state.services, settings=new, keys=keys)
                if keys.open:
                    source = new.api_tokens or "api_tokens: null"
                    log.warning("!!! no API keys in %s: the proxy is OPEN to anyone who can reach it !!!", source)

            reloader = Reloader(reload.path, reload.overrides, settings, manager, discovery, bus, install)
            if reload.signal:
                reloader.listen()
            if reload.watch:
                reloader.watch()
        await queue.start()
        manager.start_spares()  # in the background: a warm spare per configured backend (proxy/spares.py)
        try:
            yield
        finally:
            if reloader is not None:
                await reloader.close()
            await queue.close()  # first: jobs running now stay unfinished on disk, to run again at the next start
            await discovery.close()
            if cluster is not None:
                await cluster[1].close()
                await cluster[0].stop()
            await manager.shutdown()
            logbook.close()
            os.close(lock)

    middleware = [
        Middleware(RequestEvents, bus=bus),
        Middleware(RequestGuard, settings=settings),
        Middleware(PerKeyLimit),  # gives back a request's slot (limits.max_concurrent_per_key) once it is answered
    ]
    if settings.cluster is not None:
        middleware.append(Middleware(ClusterHeaders, node=settings.cluster.node, clock=clock))
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


async def _join_cluster(
    settings: Settings, manager: ModelManager, clock: Clock, bus: EventBus, metrics: Metrics
) -> tuple[Any, ClusterNet]:
    """This proxy as a node of the cluster in ``settings.cluster``: its registry on Redis (imported only
    here, so a single host never loads redis-py) and its network (routing, forwards)."""
    from proxy.cluster.local import local_state, quick_state
    from proxy.cluster.node import ClusterNode

    assert settings.cluster is not None
    node = ClusterNode(
        settings.cluster, lambda: local_state(manager), clock, quick=lambda last: quick_state(manager, last)
    )

    def changed(event: Event) -> None:
        if isinstance(event, StateChanged | LoadEnded | Unloaded):
            node.touch()  # the next route reads this node's own state again

    bus.listen(changed)
    await node.start()
    net = ClusterNet(
        settings.cluster.node,
        settings.cluster.secret,
        node,
        clock,
        heartbeat=settings.cluster.heartbeat,
        on_forward=lambda o: metrics.forwarded(o.node, o.outcome, o.added),
    )
    node.watch(net.seen)  # forwards to a node seen dead end at once
    return node, net
