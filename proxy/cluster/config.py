"""The ``cluster:`` section of config.yml, checked: ``ClusterSettings``.

Only the standard library, msgspec and ``proxy.errors`` here: ``proxy.config`` imports it whether or not a
cluster is configured.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field

import msgspec

from proxy.errors import BadRequest, ConfigError
from proxy.keepalive import parse_keep_alive

# a node's name is part of Redis keys and of the X-Cluster-Forward and X-Served-By headers
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MIN_SECRET_BYTES = 32


class ClusterSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    redis_url: str
    node: str | None = None  # default: the hostname
    advertise: str | None = None  # default: http://<server.host>:<server.port> (the hostname for 0.0.0.0)
    secret: str | None = None  # default: $CLUSTER_SECRET; at least 32 bytes, the same on every node
    heartbeat: str | float = "1s"
    dead_after: str | float = "3s"
    lease_ttl: str | float = "10s"  # a load lease lapses this long after its holder last renewed it
    prefix: str = "llmproxy"  # the Redis keys' prefix: several clusters may share one Redis


@dataclass(frozen=True)
class ClusterSettings:
    redis_url: str
    node: str
    advertise: str
    secret: str = field(repr=False)
    heartbeat: float = 1.0  # seconds between publications
    dead_after: float = 3.0  # a node not published for this long (by Redis's clock) is dead
    lease_ttl: float = 10.0
    prefix: str = "llmproxy"


def _host_for(host: str) -> str:
    if host in ("", "0.0.0.0", "::", "[::]"):
        return socket.gethostname()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def cluster_settings(raw: ClusterSection, file: str, host: str, port: int) -> ClusterSettings:
    """The section, checked; a ConfigError names the key."""
    if not raw.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(file, "cluster.redis_url", "must be a redis://, rediss:// or unix:// URL")
    node = raw.node if raw.node is not None else socket.gethostname().split(".")[0]
    if not NODE_NAME.fullmatch(node):
        raise ConfigError(file, "cluster.node", f"'{node}' must be 1-63 letters, digits, '.', '_' or '-'")
    advertise = raw.advertise or f"http://{_host_for(host)}:{port}"
    if not advertise.startswith(("http://", "https://")):
        raise ConfigError(file, "cluster.advertise", "must be an http:// or https:// URL")
    secret = raw.secret if raw.secret is not None else os.environ.get("CLUSTER_SECRET", "")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        where = "cluster.secret" if raw.secret is not None else "cluster.secret ($CLUSTER_SECRET)"
        raise ConfigError(file, where, f"must be at least {MIN_SECRET_BYTES} bytes, the same on every node")
    seconds: dict[str, float] = {}
    for key in ("heartbeat", "dead_after", "lease_ttl"):
        try:
            value = parse_keep_alive(getattr(raw, key), f"cluster.{key}")
        except BadRequest as e:
            raise ConfigError(file, f"cluster.{key}", str(e)) from None
        if value is None or not (value > 0 and math.isfinite(value)):
            raise ConfigError(file, f"cluster.{key}", "must be a positive duration")
        seconds[key] = value
    if seconds["dead_after"] <= seconds["heartbeat"]:
        raise ConfigError(file, "cluster.dead_after", "must be longer than cluster.heartbeat")
    if seconds["lease_ttl"] <= seconds["heartbeat"]:
        raise ConfigError(file, "cluster.lease_ttl", "must be longer than cluster.heartbeat (it is renewed then)")
    if not NODE_NAME.fullmatch(raw.prefix):
        raise ConfigError(file, "cluster.prefix", "must be letters, digits, '.', '_' or '-'")
    return ClusterSettings(
        redis_url=raw.redis_url,
        node=node,
        advertise=advertise.rstrip("/"),
        secret=secret,
        heartbeat=seconds["heartbeat"],
        dead_after=seconds["dead_after"],
        lease_ttl=seconds["lease_ttl"],
        prefix=raw.prefix,
    )
