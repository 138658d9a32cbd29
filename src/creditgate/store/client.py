"""redis-py's client for the store: one Redis server, or a Redis Cluster.

Both clients take the same commands for keys of one slot (every key of an organisation
shares the ``{org_id}`` tag), so the store's reads and healing transactions are written
once for ``RedisClient``. Only the batches differ: ``store.batches`` for one server,
``store.cluster`` for a cluster.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from creditgate.connections import redis_options
from creditgate.settings import Settings

RedisClient = aioredis.Redis | RedisCluster

# A failover takes the node timeout (2 s on the dev cluster, 15 s by default) plus an
# election; the store's own retries wait for it, so redis-py's are kept short.
_CONNECTION: dict[str, Any] = {
    "decode_responses": True,
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "health_check_interval": 15,
}


_PROBE_SECONDS = 5.0


def redis_client(settings: Settings, **overrides: Any) -> RedisClient:
    """The client ``settings`` ask for: the cluster's when ``CREDITGATE_REDIS_CLUSTER``
    says so, or, unset, when the server says it is a cluster node. ``overrides``:
    connection options other than the store's (timeouts, decoding)."""
    url = settings.redis_url.get_secret_value()
    options = {**_CONNECTION, **overrides, **redis_options(settings)}
    if is_cluster(settings):
        # the cluster client retries a command through redirections itself; the batches
        # follow them in store.cluster
        return RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


def is_cluster(settings: Settings) -> bool:
    """``CREDITGATE_REDIS_CLUSTER``, or when unset, whether the server is a cluster node.

    Asked once per client made, with a blocking connection of its own (a millisecond on
    a reachable Redis): the clients are made at start-up, before the loop is busy. A
    Redis that does not answer counts as one server; the start-up check
    (``connection_checks``) refuses a cluster node reached that way.
    """
    if settings.redis_cluster is not None:
        return settings.redis_cluster
    try:
        with redis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            socket_timeout=_PROBE_SECONDS,
            socket_connect_timeout=_PROBE_SECONDS,
            **redis_options(settings),
        ) as probe:
            info = probe.info("cluster")
    except (redis.RedisError, OSError):
        return False
    return str(info.get("cluster_enabled", 0)) == "1"
