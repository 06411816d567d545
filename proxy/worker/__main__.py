"""``python -m proxy.worker``: one model in one process, serving the internal API on a socket.

A warm spare (``--spare ENTRY``, see ``proxy.spares``) does its imports first, says
``{"event": "spare"}``, and gets its socket and spec as one JSON line on stdin; from there it is the same.

The proxy passes a JSON spec (backend, its entry point, served name, model file, options): the
worker knows no backend table of its own (``proxy.backends`` is the proxy's). The socket is bound
before the model loads, so nothing connects too early; when the model is loaded the worker
writes one line, ``{"event": "ready"}``, on stdout; before that, progress lines (``proxy.wire.progress_line``:
the phase, importing then loading weights, and the backend's own fraction, polled while it loads). Its log
goes to stderr, which the proxy keeps a tail of. If the model cannot be loaded the worker says why on
stderr and exits 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from proxy.wire import progress_line
from proxy.worker.guard import die_with_parent

log = logging.getLogger("proxy.worker")

_PROGRESS_POLL = 0.1  # seconds between looks at the backend's progress while it loads
_say_lock = threading.Lock()


def say(line: str) -> None:
    """One line to the proxy on stdout, whole."""
    with _say_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _report_progress(backend: Any, loading: concurrent.futures.Future[None]) -> None:
    """Until the load ends, a progress line whenever the backend's fraction moves by a percent or more
    (the first, at 0, was said before the load began: a fast load may end before this thread runs)."""
    last = 0.0
    while True:
        try:
            fraction = float(backend.progress())
        except Exception:  # a backend's progress is best effort
            fraction = last
        if fraction >= last + 0.01:
            say(progress_line(fraction, "loading weights"))
            last = fraction
        try:
            loading.result(timeout=_PROGRESS_POLL)
        except concurrent.futures.TimeoutError:
            continue
        except BaseException:
            return
        return


def make_backend(spec: dict[str, Any]) -> Any:
    """The spec's entry point, "module:Class", imported here only; every Backend class takes (served name,
    model path, options). The proxy's limits on what a worker decodes (``max_audio_seconds``,
    ``max_image_pixels``) come in the spec's ``limits`` and reach the backend among its options."""
    target = spec.get("entry")
    if not target:
        raise SystemExit(f"no entry point for backend {spec.get('backend')!r} in the spec")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    options = dict(spec.get("options", {}))
    if spec.get("cache_dir"):
        options.setdefault("cache_dir", spec["cache_dir"])
    if spec.get("prompt_cache"):
        options.setdefault("prompt_cache", spec["prompt_cache"])
    for key, value in (spec.get("limits") or {}).items():
        options.setdefault(key, value)
    return cls(spec["name"], spec["model_path"], options)


def _bind(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock


def _start_loading(backend: Any) -> concurrent.futures.Future[None]:
    """Load the weights in a thread, begun before the HTTP stack is imported so the two overlap."""
    loaded: concurrent.futures.Future[None] = concurrent.futures.Future()

    def load() -> None:
        began = time.monotonic()
        log.info("loading %s", getattr(backend, "model_path", None) or type(backend).__name__)
        try:
            backend.load()
        except BaseException as exc:  # reported to the proxy through the log and the exit code
            loaded.set_exception(exc)
        else:
            log.info("loaded in %.2fs", time.monotonic() - began)
            loaded.set_result(None)

    threading.Thread(target=load, name="load", daemon=True).start()
    return loaded


async def _serve(backend: Any, loading: concurrent.futures.Future[None], parallel: int, sock: socket.socket) -> int:
    import asyncio

    import uvicorn

    from proxy.wire import handoff_path
    from proxy.worker import handoff
    from proxy.worker.server import WorkerState, create_worker_app

    _import_http_stack()  # (imported already by a spare; here, while the weights load)
    state = WorkerState(backend, parallel=parallel)
    # streamed answers written straight to the proxy's clients (proxy.worker.handoff)
    handoffs = handoff.Handoffs(handoff.listen(handoff_path(sock.getsockname())), state)
    taking = asyncio.create_task(handoffs.serve())
    app = create_worker_app(state)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    server = _server(config, state)  # QuietServer: wakes once a second when idle, not ten times (proxy/ticks.py)
    loaded = asyncio.wrap_future(loading)
    # uvicorn takes SIGTERM while it serves and raises it again once it has stopped: with the default handler
    # that kills the process there, before a backend that keeps something across loads saves it (persist below)
    if getattr(backend, "persist", None) is not None:
        signal.signal(signal.SIGTERM, lambda _sig, _frame: setattr(server, "should_exit", True))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await asyncio.wait({loaded, serving}, return_when=asyncio.FIRST_COMPLETED)
    if not loaded.done():  # told to stop while loading: the load thread may be deep in C code
        os._exit(0)
    try:
        loaded.result()
    except Exception as exc:
        sys.stderr.write(f"failed to load model: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        server.should_exit = True
        await serving
        return 1
    state.ready = True
    say(json.dumps({"event": "ready", "pid": os.getpid()}))
    await asyncio.wait({serving, asyncio.ensure_future(server.quit.wait())}, return_when=asyncio.FIRST_COMPLETED)
    taking.cancel()
    await handoffs.close()  # the streams written to the proxy's clients let go of the model first
    persist = getattr(backend, "persist", None)
    if persist is not None:  # what the backend keeps across loads (llama.cpp's prompt cache), bounded in time
        try:
            persist()
        except Exception:
            log.exception("saving the backend's state at unload failed")
    backend.close()
    if server.quit.is_set():  # nothing in flight, the state saved: the interpreter's teardown is not waited for
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _server(config: Any, state: Any) -> Any:
    """uvicorn's server (``proxy.ticks.QuietServer``), but a SIGTERM while no request is in flight ends it at
    once (``quit``): uvicorn's own stop waits for its next tick and then sleeps 100 ms more for connections
    that are only idle keep-alives here, and a switch (unload one model, load the next) waits for that stop.
    With a request in flight, uvicorn's graceful stop as before."""
    import asyncio
    from types import FrameType

    import uvicorn

    from proxy.ticks import QuietServer

    class Server(QuietServer):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.quit = asyncio.Event()
            self._running = asyncio.get_running_loop()

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGTERM and state.ready and state.in_flight == 0:
                self._running.call_soon_threadsafe(self.quit.set)  # wakes the loop (a handler's set would not)
                return
            super().handle_exit(sig, frame)

    return Server(config)


def _import_backend(entry: str | None) -> None:
    """A spare's work before its spec: the backend's module and libraries (its ``prepare``, a static
    method), and the HTTP stack the worker serves with."""
    if entry:
        module_name, _, class_name = entry.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        prepare = getattr(cls, "prepare", None)
        if prepare is not None:
            prepare()
    _import_http_stack()


def _import_http_stack() -> None:
    """The HTTP stack the worker serves with, and what its first request would import: anyio (Starlette's)
    imports its parts when one of its names is first used (since anyio 4.x), which put ~30 ms of imports
    (its task groups, streams, sockets) between a cold model's ready line and its first token. Here they are
    imported while the weights load (or while a spare waits)."""
    import asyncio  # noqa: F401

    import anyio
    import uvicorn  # noqa: F401

    import proxy.worker.server  # noqa: F401

    # the names whose modules a streamed request's first use imports (older anyio: imported already)
    for name in ("create_task_group", "create_memory_object_stream", "TaskInfo", "connect_unix", "lowlevel"):
        getattr(anyio, name, None)


def _wait_for_spec() -> tuple[str, dict[str, Any]] | None:
    """A spare: one line on stdin, ``{"socket": ..., "spec": ...}``; None when stdin closes (dismissed)."""
    line = sys.stdin.readline()
    if not line.strip():
        return None
    handoff = json.loads(line)
    return str(handoff["socket"]), dict(handoff["spec"])


def run(socket_path: str, spec: dict[str, Any]) -> None:
    """Serve ``spec``'s model on ``socket_path`` (the socket is bound before the model loads)."""
    sock = _bind(socket_path)
    say(progress_line(0.0, "importing"))
    backend = make_backend(spec)
    # Imports first, in this thread (they hold the GIL); then the weights load in a thread, mostly in C
    # with the GIL released, while this thread imports the HTTP stack: the two overlap instead of contending.
    prepare = getattr(backend, "prepare", None)
    if prepare is not None:
        prepare()
    say(progress_line(0.0, "loading weights"))  # here, so that it always comes before the ready line
    loading = _start_loading(backend)
    threading.Thread(target=_report_progress, args=(backend, loading), name="progress", daemon=True).start()
    import asyncio  # here, not at the top: its import overlaps the load (llama.cpp's start is a bench goal)

    raise SystemExit(asyncio.run(_serve(backend, loading, int(spec.get("parallel", 1)), sock)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.worker")
    parser.add_argument("--socket", help="Unix socket path to serve on")
    parser.add_argument("--spec", help="JSON: backend, entry, name, model_path, options, parallel")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process exits")
    parser.add_argument(
        "--spare",
        metavar="ENTRY",
        help="a warm spare for this backend entry point: import it, say so, then read the socket and spec on stdin",
    )
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the proxy stops us with SIGTERM
    if args.spare is not None:
        _import_backend(args.spare)
        say(json.dumps({"event": "spare", "pid": os.getpid()}))
        handoff = _wait_for_spec()
        if handoff is None:
            raise SystemExit(0)
        run(*handoff)
    if args.socket is None or args.spec is None:
        parser.error("--socket and --spec are required (or --spare)")
    run(args.socket, json.loads(args.spec))


if __name__ == "__main__":
    main()
