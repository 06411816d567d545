"""The CLI's client commands run as subprocesses against a live proxy with SmolLM2 in a real llama.cpp worker:
ps before and after a load, models, load, logs (and -f), unload, bad keys and no proxy at all."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import REPO, LiveProxy, free_port, smollm2_config, wait_until

pytestmark = pytest.mark.real

MODEL = "smollm2:135m"
KEYS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}
CLI = [sys.executable, "-m", "proxy"]  # the proxy console script


def cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROXY_API_KEY"}
    if key is not None:
        env["PROXY_API_KEY"] = key
    return subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def rows(output: str) -> dict[str, list[str]]:
    """A table's rows by their first column (columns are split on runs of 3 spaces)."""
    lines = output.strip().splitlines()
    out: dict[str, list[str]] = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.split("   ") if c.strip()]
        out[cells[0]] = cells
    return out


def test_ps_models_load_logs_unload_and_errors(make_proxy: Any, tmp_path: Path) -> None:
    proxy: LiveProxy = make_proxy([smollm2_config()], tokens=KEYS)
    url = ["--url", proxy.url]

    before = cli("ps", *url, key="user-key")
    assert before.returncode == 0, before.stderr
    assert before.stdout.split() == ["NAME", "STATE", "SIZE", "PROCESSOR", "UNTIL"] and rows(before.stdout) == {}

    listed = cli("models", *url, key="user-key")
    assert rows(listed.stdout)[MODEL] == [MODEL, "llama_cpp", "llm", "stopped"]

    # a user key may look but not load: the server's reason on one line, exit status 1
    refused = cli("load", MODEL, *url, key="user-key")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == "Error: 403 Forbidden: this endpoint needs an admin key"
    wrong = cli("ps", *url, "--key", "wrong-key")
    assert wrong.returncode == 1 and wrong.stderr.strip() == "Error: 401 Unauthorized: invalid API key"
    unknown = cli("load", "no-such-model", *url, key="admin-key")
    assert unknown.returncode == 1 and "404 Not Found" in unknown.stderr and "no-such-model" in unknown.stderr

    # logs -f, started before the load, prints the worker's lines as they come
    follow = [*CLI, "logs", MODEL, "-f", *url, "--key", "admin-key"]
    with subprocess.Popen(follow, cwd=REPO, stdout=subprocess.PIPE, text=True) as follower:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(follower.stdout or ()), daemon=True)
        reader.start()
        try:
            loaded = cli("load", "smollm2", *url, key="admin-key")  # an alias
            assert loaded.returncode == 0 and loaded.stdout.strip() == f"loaded {MODEL}"
            wait_until(lambda: any("loaded in" in line for line in lines))
            assert follower.poll() is None
        finally:
            follower.terminate()
        reader.join(30)

    # the address from config.yml's server section, the key from --key
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"server": {"host": "0.0.0.0", "port": proxy.port}}))
    after = cli("ps", "--config", str(config), "--key", "user-key")
    assert after.returncode == 0, after.stderr
    name, state, size, where, until = rows(after.stdout)[MODEL]
    assert (name, state, where) == (MODEL, "ready", "CPU")
    assert size.endswith("MB") and float(size.split()[0]) > 0
    assert until.endswith("minutes from now") and 8 <= int(until.split()[0]) <= 9  # keep_alive 10m

    tail = cli("logs", MODEL, *url, key="admin-key")
    assert tail.returncode == 0 and "loaded in" in tail.stdout, tail.stderr

    unloaded = cli("unload", *url, key="admin-key")
    assert unloaded.returncode == 0 and unloaded.stdout.strip() == f"unloaded {MODEL}"
    assert rows(cli("ps", *url, key="admin-key").stdout) == {}
    again = cli("unload", MODEL, *url, key="admin-key")
    assert again.returncode == 0 and again.stdout.strip() == f"{MODEL} was not loaded"

    nobody = f"http://127.0.0.1:{free_port()}"
    gone = cli("ps", "--url", nobody)
    assert gone.returncode == 1 and gone.stderr.strip() == f"Error: no proxy at {nobody}"


def test_an_address_that_is_not_the_proxy_is_said_in_one_line(tmp_path: Path) -> None:
    # a plain web server (a directory listing, HTML) at the address: a one-line error, exit 1, no traceback
    import functools
    import http.server

    (tmp_path / "status").write_text("<html><body>a web page</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = cli("ps", "--url", url)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1, result
    assert result.stderr.strip() == f"Error: {url} answered /status with something other than JSON: not this proxy?"
