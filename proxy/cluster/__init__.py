"""Several proxies, one endpoint: the cluster's registry, routing and load leases on Redis (issue 27).

``config`` (the ``cluster:`` section), ``view`` (what a node knows of the others: plain data), ``routing``
(where a request goes: pure), ``node`` (this node's publication, its in-memory copy of the registry, the
load leases; the one module that talks to Redis), ``local`` (this node's own state, read from its manager).
Nothing here is imported unless ``cluster:`` is set in config.yml, so a single host never loads redis-py.
"""
