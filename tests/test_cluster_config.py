"""The cluster: section of config.yml (proxy/cluster/config.py through proxy.config.load_settings)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_settings
from proxy.errors import ConfigError
from tests.test_config import write

SECRET = "x" * 32


def cluster(tmp_path: Path, **section: Any) -> Path:
    return write(
        tmp_path, {"server": {"port": 12000}, "cluster": {"redis_url": "redis://127.0.0.1:6390", **section}}, {}
    )


def test_no_cluster_section_is_one_host(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, {}, {})).cluster is None


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_SECRET", SECRET)
    c = load_settings(cluster(tmp_path)).cluster
    assert c is not None
    assert c.node == socket.gethostname().split(".")[0]
    assert c.advertise == "http://127.0.0.1:12000"
    assert (c.secret, c.heartbeat, c.dead_after) == (SECRET, 1.0, 3.0)
    assert SECRET not in repr(c)


def test_values_and_durations(tmp_path: Path) -> None:
    c = load_settings(
        cluster(
            tmp_path, node="gpu-1", advertise="http://10.0.0.2:11434/", secret=SECRET, heartbeat="500ms", dead_after=2
        )
    ).cluster
    assert c is not None
    assert (c.node, c.advertise, c.heartbeat, c.dead_after) == ("gpu-1", "http://10.0.0.2:11434", 0.5, 2.0)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"secret": "short"}, "cluster.secret"),
        ({}, "cluster.secret ($CLUSTER_SECRET)"),
        ({"secret": SECRET, "node": "bad name"}, "cluster.node"),
        ({"secret": SECRET, "redis_url": "http://x"}, "cluster.redis_url"),
        ({"secret": SECRET, "heartbeat": "3s"}, "cluster.dead_after"),
        ({"secret": SECRET, "heartbeat": "soon"}, "cluster.heartbeat"),
        ({"secret": SECRET, "advertise": "10.0.0.2:1"}, "cluster.advertise"),
        ({"secret": SECRET, "colour": "red"}, "cluster"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: dict[str, Any], key: str
) -> None:
    monkeypatch.delenv("CLUSTER_SECRET", raising=False)
    with pytest.raises(ConfigError) as e:
        load_settings(cluster(tmp_path, **section))
    assert key in str(e.value)


def test_a_models_replicas(tmp_path: Path) -> None:
    model = {"name": "m", "backend": "external", "url": "http://127.0.0.1:1"}
    models = load_settings(
        write(tmp_path, {}, {"m.yaml": {**model, "replicas": 2}, "n.yaml": {**model, "name": "n"}})
    ).models
    assert [(m.name, m.replicas) for m in models] == [("m", 2), ("n", 1)]
    with pytest.raises(ConfigError, match="replicas"):
        load_settings(write(tmp_path, {}, {"m.yaml": {**model, "replicas": 0}}))
