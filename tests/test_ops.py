"""/status/events, /logs/{model} and /metrics' access on a live proxy with fake workers (edge cases:
a crash, a line on demand, keys). The same endpoints on the real SmolLM2 worker: tests/test_ops_real.py."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from proxy.metrics import NAMES
from tests.harness import REPO, LiveProxy, fake_config, wait_until

MakeProxy = Callable[..., LiveProxy]
KEYS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}
ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs from an SSE text stream; comments skipped."""
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


class Collected:
    """Events from /status/events, read in a thread, until ``until`` says stop."""

    def __init__(self, proxy: LiveProxy, until: Callable[[list[tuple[str, dict[str, Any]]]], bool]) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.connected = threading.Event()
        self._until = until
        self._thread = threading.Thread(target=self._read, args=(proxy,), daemon=True)
        self._thread.start()
        assert self.connected.wait(30)

    def _read(self, proxy: LiveProxy) -> None:
        with httpx.stream("GET", proxy.url + "/status/events", headers=ADMIN, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for event in sse_events(r.iter_lines()):
                self.events.append(event)
                self.connected.set()
                if self._until(self.events):
                    return

    def wait(self) -> list[tuple[str, dict[str, Any]]]:
        self._thread.join(60)
        assert not self._thread.is_alive(), f"events so far: {self.events}"
        return self.events


def test_events_start_with_a_snapshot_and_report_a_crash_with_its_reason(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake", "--crash-after", "2")], tokens=KEYS)
    seen = Collected(proxy, lambda events: any(name == "unload" for name, _ in events))
    with proxy.client(headers=USER) as c:
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and '"error"' in r.text  # the stream ends with an explicit error
    events = seen.wait()
    name, snapshot = events[0]
    assert name == "snapshot" and [m["name"] for m in snapshot["models"]] == ["fake"]
    assert snapshot["models"][0]["state"] == "stopped"
    states = [(d["old"], d["new"]) for n, d in events if n == "state"]
    assert states == [("stopped", "starting"), ("starting", "ready"), ("ready", "stopped")]
    unload = next(d for n, d in events if n == "unload")
    assert unload["model"] == "fake" and unload["reason"] == "crash"
    assert "exited unexpectedly" in unload["detail"]
    load_end = next(d for n, d in events if n == "load_end")
    assert load_end["ok"] is True and load_end["seconds"] >= 0


def test_logs_tail_follow_keys_and_names(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("team/fake", "--say", "--rate", "0")], tokens=KEYS)
    chat = {"model": "team/fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with proxy.client(headers=USER) as c:
        assert c.post("/v1/chat/completions", json={**chat, "user": "first line"}).status_code == 200
    with proxy.client(headers=ADMIN) as c:
        tail = c.get("/logs/team/fake")
        assert tail.status_code == 200 and tail.headers["content-type"].startswith("text/plain")
        assert "fake worker says: first line" in tail.text and "loading" in tail.text
        assert c.get("/logs/team/fake", params={"lines": "1"}).text == "fake worker says: first line\n"
        assert c.get("/logs/team/fake", params={"lines": "x"}).status_code == 400
        missing = c.get("/logs/nope")
        assert missing.status_code == 404 and "error" in missing.json()
        assert c.get("/logs/..%2F..%2Fetc%2Fpasswd").status_code == 404
    with httpx.Client(base_url=proxy.url) as c:
        assert c.get("/logs/team/fake", headers=USER).status_code == 403
        assert c.get("/logs/team/fake").status_code == 401
        assert c.get("/status/events", headers=USER).status_code == 403
        assert c.get("/status/requests", headers=USER).status_code == 403
    # the file: under log_dir, its name made safe (no subdirectory from the "/")
    log_file = proxy.root / "logs" / "team_fake.log"
    assert "fake worker says: first line" in log_file.read_text()
    assert [p.name for p in (proxy.root / "logs").iterdir()] == ["team_fake.log"]

    # follow: a line the worker writes after the follow began comes through
    got: list[str] = []
    following = threading.Event()

    def follow() -> None:
        with httpx.stream(
            "GET", proxy.url + "/logs/team/fake", params={"follow": "true", "lines": "1"}, headers=ADMIN, timeout=60
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                got.append(line)
                following.set()
                if "second line" in line:
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert following.wait(30)  # the tail's last line came: the follower is subscribed
    with proxy.client(headers=USER) as c:
        assert c.post("/v1/chat/completions", json={**chat, "user": "second line"}).status_code == 200
    reader.join(30)
    assert got == ["fake worker says: first line", "fake worker says: second line"]
    # the follower that left is gone, and so is every event stream that left: nothing piles up
    with proxy.client(headers=ADMIN) as c:
        assert "second line" in c.get("/logs/team/fake").text
    wait_until(lambda: watchers(proxy) == {"events": 1, "logs": {}}, timeout=30, interval=0.2)


def watchers(proxy: LiveProxy) -> dict[str, Any]:
    """Who watches the proxy, as the snapshot of a new event stream says (that stream counts itself)."""
    with httpx.stream("GET", proxy.url + "/status/events", headers=ADMIN, timeout=30) as r:
        for name, data in sse_events(r.iter_lines()):
            assert name == "snapshot"
            found: dict[str, Any] = data["watchers"]
            return found
    raise AssertionError("no snapshot")


def test_metrics_need_a_key_only_when_not_public(make_proxy: MakeProxy) -> None:
    public = make_proxy([fake_config("fake")], tokens=KEYS)
    r = httpx.get(public.url + "/metrics")
    assert r.status_code == 200 and "proxy_models_loaded 0.0" in r.text
    private = make_proxy([fake_config("fake")], tokens=KEYS)
    config = private.root / "config.yml"
    private.stop()
    text = config.read_text().replace("server:\n", "server:\n  metrics_public: false\n")
    config.write_text(text)
    private.start()
    assert httpx.get(private.url + "/metrics").status_code == 401
    assert httpx.get(private.url + "/metrics", headers=USER).status_code == 200


def test_the_grafana_dashboard_queries_only_metrics_the_proxy_exports() -> None:
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    exported = set(NAMES)
    # histograms export _bucket, _sum and _count series
    series = exported | {f"{n}{s}" for n in exported for s in ("_bucket", "_sum", "_count")}
    used = set()
    for expr in exprs:
        for name in re.findall(r"\b(proxy_[a-z_]+)\b", expr):
            used.add(name)
            assert name in series, f"{name} in {expr!r} is not a metric the proxy exports"
    assert {n for n in exported if any(u.startswith(n) for u in used)} == exported, "every metric on the dashboard"
    assert dashboard["title"] and dashboard["schemaVersion"] >= 30
