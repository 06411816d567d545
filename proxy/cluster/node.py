"""This node in the cluster: its publication to Redis, its in-memory copy of the registry, the load leases.

The one module that talks to Redis (redis-py's asyncio client), and only from the heartbeat and from
``lease``/``release``: ``view()`` is a plain read of what the last heartbeat brought, so routing a warm
request costs no Redis command.

Keys (``P`` is ``cluster.prefix``):

- ``P:nodes``         sorted set: node name -> its last publication, in ms by Redis's clock
- ``P:node:NAME``     its publication (JSON: ``view.publication``), kept a while after it stops (``KEEP``)
- ``P:owner:NAME``    the instance that owns the name, expires ``dead_after`` after its last heartbeat: a
                      second node with the same name is refused while the first is alive
- ``P:epoch:NAME``    counts the starts of that name (each start publishes a new epoch)
- ``P:lease:MODEL:N`` a load lease (slot N < replicas): "owner|node|token|ram|vram|advertise", PX ``lease_ttl``
- ``P:fence:MODEL``   the fencing tokens' counter: every lease gets a larger one
- ``P:leases``        sorted set: live lease keys -> their expiry (read with the nodes each heartbeat)

Liveness is by Redis's clock (``TIME`` inside the scripts): a node is alive while its last publication is at
most ``dead_after`` old, whatever the hosts' clocks say. Redis out of reach: logged once, the view is this node
alone (it serves its own models, routes nothing it can't see), and each heartbeat tries again, so the node
rejoins within a heartbeat (plus the connect timeout) of Redis's return.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.clock import Clock, SystemClock
from proxy.cluster.config import ClusterSettings
from proxy.cluster.view import (
    HOLDING,
    ClusterView,
    LocalState,
    ModelPresence,
    NodeInfo,
    from_publication,
    node_from,
    publication,
)
from proxy.errors import ConfigError

log = logging.getLogger("proxy.cluster")

KEEP = 60.0  # seconds a dead node's publication stays readable (GET /cluster shows it, alive: false)

# claim the name (refused while another instance owns it) and count this start: -> {epoch} or {-1, owner}
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {-1, cur} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {redis.call('INCR', KEYS[2]), ''}
"""

# publish this node (owner checked), stamped by Redis's clock: -> {ms} or {-1, owner}
_PUBLISH = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {-1, cur} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ms, ARGV[5])
return {ms, ''}
"""

# every node's publication and every live lease, with Redis's time: -> {ms, {name, ms, json...}, {key, value...}}
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local names = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local nodes = {}
for i = 1, #names, 2 do
  local data = redis.call('GET', ARGV[1] .. ':node:' .. names[i])
  if data then
    table.insert(nodes, names[i])
    table.insert(nodes, names[i + 1])
    table.insert(nodes, data)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local keys = redis.call('ZRANGE', KEYS[2], 0, -1)
local leases = {}
for i = 1, #keys do
  local v = redis.call('GET', keys[i])
  if v then
    table.insert(leases, keys[i])
    table.insert(leases, v)
  end
end
return {now, nodes, leases}
"""

# the load lease: the first free slot of KEYS[1..n] (SET NX PX) with the next fencing token and the memory
# it reserves on the node that will load; -> {token, value, key} or {0, a holder's value, ''}
_LEASE = """
local n = tonumber(ARGV[5])
local fence, index = KEYS[n + 1], KEYS[n + 2]
local held = false
for i = 1, n do
  local cur = redis.call('GET', KEYS[i])
  if not cur then
    local token = redis.call('INCR', fence)
    local value = ARGV[1] .. '|' .. token .. '|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[6]
    redis.call('SET', KEYS[i], value, 'NX', 'PX', ARGV[2])
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('ZADD', index, now + tonumber(ARGV[2]), KEYS[i])
    return {token, value, KEYS[i]}
  end
  held = held or cur
end
return {0, held, ''}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), KEYS[1])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
"""


class DuplicateNode(ConfigError):
    """Another live proxy has this node's name: this one refuses to start."""


@dataclass(frozen=True)
class LeaseInfo:
    """A load lease as stored: who took it, which node loads (and its address), its fencing token, the memory
    it reserves."""

    owner: str
    node: str
    token: int
    ram: int
    vram: int
    advertise: str = ""

    @classmethod
    def parse(cls, value: str) -> LeaseInfo | None:
        parts = value.split("|")
        if len(parts) != 6:
            return None
        try:
            return cls(parts[0], parts[1], int(parts[2]), int(parts[3]), int(parts[4]), parts[5])
        except ValueError:
            return None


@dataclass(frozen=True)
class Lease:
    """A load lease this node holds: the load of ``model`` on ``node`` is the only one of its slot in the
    cluster until released or lapsed (``lease_ttl`` after the last renewal; the holder renews it each
    heartbeat). ``token`` grows with each lease of the model: a stale holder can be told apart."""

    model: str
    node: str
    token: int
    key: str
    value: str


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class ClusterNode:
    """This proxy as one node: ``start()`` claims the name and publishes, the heartbeat keeps doing it and
    refreshes the view; ``view()`` and ``lease()`` are what routing uses. ``local`` reads this node's state
    (``proxy.cluster.local.local_state`` over the manager) once per heartbeat; after ``touch()``, ``view()``
    reads it again with ``quick`` (``local.quick_state``: states and request counts, no probe) when given."""

    def __init__(
        self,
        settings: ClusterSettings,
        local: Callable[[], LocalState],
        clock: Clock | None = None,
        *,
        source: str = "config.yml",
        client: aioredis.Redis | None = None,
        quick: Callable[[LocalState], LocalState] | None = None,
    ) -> None:
        self.settings = settings
        self._local = local
        self._quick = quick
        self._last = LocalState()  # what ``local`` answered last
        self._clock = clock or SystemClock()
        self._source = source
        timeout = min(settings.heartbeat, 1.0)
        self.redis: aioredis.Redis = client or aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self.where = redacted(settings.redis_url)  # for logs: the URL without its password
        self.instance = uuid.uuid4().hex
        self.epoch = 0
        self.connected = False
        self._claimed = False
        self._warned = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._remote: dict[str, NodeInfo] = {}
        self._leases: dict[str, LeaseInfo] = {}  # model -> a live lease (any holder), from the last read
        self._held: dict[str, Lease] = {}  # key -> the leases this node holds (renewed each heartbeat)
        self._here = self._me(LocalState())
        self._view = ClusterView(settings.node, {settings.node: self._here}, connected=False)
        self._dirty = True
        self._watchers: list[Callable[[ClusterView], None]] = []
        p = settings.prefix
        self._k_nodes, self._k_leases = f"{p}:nodes", f"{p}:leases"
        self._claim = self.redis.register_script(_CLAIM)
        self._publish = self.redis.register_script(_PUBLISH)
        self._read = self.redis.register_script(_READ)
        self._lease = self.redis.register_script(_LEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    # -- the warm path: no I/O ----------------------------------------------------------------------------
    def view(self) -> ClusterView:
        """The registry as the last heartbeat read it, with this node as it is now (after ``touch``)."""
        if self._dirty:
            self._dirty = False
            self._here = self._me(self._quick(self._last) if self._quick is not None else self._read_local())
            self._view = self._build()
        return self._view

    def touch(self) -> None:
        """This node's state changed (a model loaded, a request began or ended): the next ``view()`` reads it
        again, with ``quick`` when given (states and counts only), else ``local``."""
        self._dirty = True

    def watch(self, seen: Callable[[ClusterView], None]) -> None:
        """``seen(view)`` after each heartbeat that read the registry (``ClusterNet.seen``: forwards to a node
        seen dead end then)."""
        self._watchers.append(seen)

    # -- life ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Claim the node's name and publish; raise DuplicateNode when another live node has the name (a dead
        one's claim lapses after ``dead_after``, so it is waited for that long). Redis out of reach: start
        alone (logged) and join when it comes."""
        s = self.settings
        deadline = self._clock.monotonic() + s.dead_after + s.heartbeat
        while True:
            try:
                other = await self._take_name()
                if other is None:
                    await self._beat()
                    break
            except (RedisError, OSError) as e:
                self._lost(e)
                break
            if self._clock.monotonic() >= deadline:
                await self.redis.aclose()
                raise DuplicateNode(
                    self._source,
                    "cluster.node",
                    f"'{s.node}' is the name of another live node of the cluster at {self.where}; give each "
                    "node its own name",
                )
            await self._sleep(s.heartbeat / 2)
        self._task = asyncio.create_task(self._run(), name=f"cluster heartbeat {s.node}")

    async def stop(self) -> None:
        """Stop the heartbeat, give back this node's leases and name (a clean stop is seen at once)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            if self.connected:
                for lease in list(self._held.values()):
                    await self._release(keys=[lease.key, self._k_leases], args=[lease.value])
                p, name = self.settings.prefix, self.settings.node
                if _text(await self.redis.get(f"{p}:owner:{name}") or b"") == self.instance:
                    await self.redis.delete(f"{p}:owner:{name}")
                    await self.redis.zrem(self._k_nodes, name)
        self._held.clear()
        await self.redis.aclose()

    async def _run(self) -> None:
        while not self._stopping:
            await self._sleep(self.settings.heartbeat)
            if self._stopping:
                return
            try:
                await self._beat()
            except (RedisError, OSError) as e:
                self._lost(e)
            except Exception:  # a bug here must not end the heartbeat
                log.exception("cluster heartbeat failed")

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        timer = self._clock.call_later(seconds, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    # -- Redis ---------------------------------------------------------------------------------------------
    async def _take_name(self) -> str | None:
        """Claim the name; None when it is ours now, else the other instance's id."""
        s, p = self.settings, self.settings.prefix
        got = await self._claim(
            keys=[f"{p}:owner:{s.node}", f"{p}:epoch:{s.node}"], args=[self.instance, _ms(s.dead_after)]
        )
        if int(got[0]) < 0:
            return _text(got[1])
        if self.epoch == 0:
            self.epoch = int(got[0])
        self._claimed = True
        return None

    async def _beat(self) -> None:
        """One heartbeat: publish this node, renew its leases, read every node and lease."""
        s, p = self.settings, self.settings.prefix
        if not self._claimed and await self._take_name() is not None:
            self._lost_name()
            return
        self._here = self._me(self._read_local())  # after the claim: a first claim sets the epoch
        self._dirty = False
        payload = json.dumps(publication(self._here), separators=(",", ":"))
        got = await self._publish(
            keys=[f"{p}:owner:{s.node}", f"{p}:node:{s.node}", self._k_nodes],
            args=[self.instance, _ms(s.dead_after), payload, _ms(max(KEEP, s.dead_after * 10)), s.node],
        )
        if int(got[0]) < 0:
            self._claimed = False
            self._lost_name()
            return
        for key, lease in list(self._held.items()):
            if not await self._renew(keys=[key, self._k_leases], args=[lease.value, _ms(s.lease_ttl)]):
                self._held.pop(key, None)
                log.warning("cluster: the load lease of %s (token %d) lapsed", lease.model, lease.token)
        now, nodes, leases = await self._read(keys=[self._k_nodes, self._k_leases], args=[p, _ms(KEEP)])
        self._absorb(int(now), nodes, leases)
        if not self.connected:
            if self._warned:
                log.info("cluster: Redis at %s is back: node %s rejoined", self.where, s.node)
            self.connected = True
            self._warned = False
        self._view = self._build()
        for seen in self._watchers:
            seen(self._view)

    def _absorb(self, now_ms: int, nodes: list[Any], leases: list[Any]) -> None:
        remote: dict[str, NodeInfo] = {}
        for i in range(0, len(nodes), 3):
            name, stamp, data = _text(nodes[i]), float(_text(nodes[i + 1])), nodes[i + 2]
            if name == self.settings.node:
                continue
            try:
                d = json.loads(data)
            except ValueError:
                continue
            age = max(0.0, (now_ms - stamp) / 1000)
            remote[name] = from_publication(d, age=age, alive=age <= self.settings.dead_after)
        self._remote = remote
        found: dict[str, LeaseInfo] = {}
        head = f"{self.settings.prefix}:lease:"
        for i in range(0, len(leases), 2):
            key, info = _text(leases[i]), LeaseInfo.parse(_text(leases[i + 1]))
            if info is not None and key.startswith(head):
                found.setdefault(key[len(head) :].rsplit(":", 1)[0], info)
        for lease in self._held.values():  # ours, even when taken after this read began
            info = LeaseInfo.parse(lease.value)
            if info is not None:
                found.setdefault(lease.model, info)
        self._leases = found

    def _lost(self, error: BaseException) -> None:
        """Redis out of reach: alone until it answers again (logged once)."""
        if not self._warned:
            log.warning(
                "cluster: Redis at %s is out of reach (%s): node %s serves its own models alone until it is back",
                self.where,
                error,
                self.settings.node,
            )
            self._warned = True
        self.connected = False
        self._remote = {}
        self._leases = {}
        self._here = self._me(self._read_local())
        self._view = self._build()

    def _lost_name(self) -> None:
        if not self._warned:
            log.error(
                "cluster: another live node took the name %s: this node serves alone until the name is free",
                self.settings.node,
            )
            self._warned = True
        self.connected = False
        self._remote = {}
        self._leases = {}
        self._view = self._build()

    # -- leases --------------------------------------------------------------------------------------------
    async def lease(
        self, model: str, *, node: str | None = None, ram: int = 0, vram: int = 0, replicas: int = 1
    ) -> Lease | None:
        """Take the load lease of ``model`` for ``node`` (default this one), reserving its memory there; None
        when every one of its ``replicas`` slots is held: the view then shows the holder loading it, so routing
        again forwards there. Redis out of reach: a lease of this node alone (``token`` 0, nothing stored), since
        no other node can be seen: load here."""
        s, p = self.settings, self.settings.prefix
        target = node or s.node
        keys = [f"{p}:lease:{model}:{i}" for i in range(max(1, replicas))]
        try:
            got = await self._lease(
                keys=[*keys, f"{p}:fence:{model}", self._k_leases],
                args=[f"{s.node}|{target}", _ms(s.lease_ttl), ram, vram, len(keys), self._address(target)],
            )
        except (RedisError, OSError) as e:
            self._lost(e)
            return Lease(model=model, node=target, token=0, key="", value="")
        token, value, key = int(got[0]), _text(got[1]), _text(got[2])
        info = LeaseInfo.parse(value)
        if info is not None:
            self._leases[model] = info
            self._view = self._build()
        if token <= 0:
            return None
        lease = Lease(model=model, node=target, token=token, key=key, value=value)
        self._held[key] = lease
        return lease

    async def release(self, lease: Lease) -> None:
        """Give the lease back (the load ended: ready, failed or abandoned); a lapsed one is left alone."""
        self._held.pop(lease.key, None)
        if lease.token == 0:
            return
        known = self._leases.get(lease.model)
        if known is not None and known.token == lease.token:
            del self._leases[lease.model]
            self._view = self._build()
        try:
            await self._release(keys=[lease.key, self._k_leases], args=[lease.value])
        except (RedisError, OSError) as e:
            self._lost(e)

    def _address(self, node: str) -> str:
        info = self._view.nodes.get(node)
        return info.advertise if info is not None else ""

    # -- the view ------------------------------------------------------------------------------------------
    def _read_local(self) -> LocalState:
        self._last = self._local()
        return self._last

    def _me(self, local: LocalState) -> NodeInfo:
        s = self.settings
        return node_from(local, node=s.node, advertise=s.advertise, epoch=self.epoch, age=0.0, alive=True)

    def _build(self) -> ClusterView:
        nodes = {name: info for name, info in self._remote.items()}
        nodes[self.settings.node] = self._here
        for model, lease in self._leases.items():
            info = nodes.get(lease.node)
            if info is None and lease.advertise:
                # a node that joined after the last read: known by its lease until its publication is read
                info = NodeInfo(lease.node, lease.advertise, 0, "", (), (), 0, (), 0.0, True)
            if info is not None:
                nodes[lease.node] = reserve(info, model, lease)
        return ClusterView(self.settings.node, nodes, connected=self.connected)


def reserve(info: NodeInfo, model: str, lease: LeaseInfo) -> NodeInfo:
    """A node with a load lease on it: the model shows as starting there (unless it already holds memory
    there), and the memory the lease reserves is no longer free."""
    if info.state_of(model) in HOLDING:
        return info
    old = info.model(model)
    starting = ModelPresence(
        model,
        "starting",
        in_flight=old.in_flight if old else 0,
        queued=old.queued if old else 0,
        ram=lease.ram or (old.ram if old else 0),
        vram=lease.vram or (old.vram if old else 0),
        parallel=old.parallel if old else 1,
        kind=old.kind if old else None,
        capabilities=old.capabilities if old else None,
    )
    models = tuple(m for m in info.models if m.name != model) + (starting,)
    free_vram = list(info.free_vram)
    if free_vram and starting.vram:
        g = max(range(len(free_vram)), key=free_vram.__getitem__)
        free_vram[g] = max(0, free_vram[g] - starting.vram)
    return replace(
        info,
        models=models,
        free_ram=max(0, info.free_ram - starting.ram),
        free_vram=tuple(free_vram),
        catalog=info.catalog if model in info.catalog else (*info.catalog, model),
    )


def redacted(url: str) -> str:
    """A Redis URL fit for a log line: its password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
