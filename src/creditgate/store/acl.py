"""The Redis ACL creditgate's user needs: its commands and its key prefixes, no more.

``redis_acl_rules`` is what an operator grants (``ACL SETUSER`` or an aclfile line); the
local secure stack grants it too (``devstack/secure.py``), and ``tests/integration/
test_secure.py`` checks that the scripts use no command missing here.
"""

from __future__ import annotations

# Every command creditgate sends to Redis, from Python or from its Lua scripts (Redis
# checks a script's commands against the caller's ACL too). An ACL user for creditgate
# needs these and its key pattern, nothing else: see `redis_acl_rules`.
REDIS_COMMANDS = (
    # the store: scripts are loaded once, then called by hash
    "script|load",
    "evalsha",
    # inside charge.lua and command.lua
    "get",
    "mget",
    "set",
    "incr",
    "del",
    "pexpire",
    "hget",
    "hmget",
    "hset",
    "hsetnx",
    "hdel",
    "hexists",
    "hincrby",
    "sadd",
    "srem",
    "sismember",
    "zadd",
    "zremrangebyscore",
    "zrem",
    "zrange",
    "time",
    # the hold sweep's index (store/holds.py): holds due, taken out once published
    "zrangebyscore",
    # reads of the HTTP API
    "hgetall",
    "exists",
    "zrevrange",
    "zrevrank",
    "zrevrangebyscore",
    # healing from the ledger (stream/healing.py): the checkpoint, an organisation's
    # state read and written back in one WATCHed transaction (and zrange above)
    "smembers",
    "watch",
    "unwatch",
    "multi",
    "exec",
    "discard",
    # the client's health checks
    "ping",
    # the start-up check reads maxmemory-policy (creditgate.preflight): CONFIG GET would
    # also show every other setting, INFO only server figures, never keys or values
    "info",
    # the rebuild from the ledger (and test clean-up) find an organisation's keys with
    # SCAN. Redis cannot limit SCAN to a key pattern: it lists other key names (never
    # their values) to anyone allowed to run it.
    "scan",
)


def redis_acl_rules(*key_prefixes: str) -> str:
    """The Redis ACL rules of a user limited to creditgate's keys and commands.

    For `ACL SETUSER <user> on ><password> <rules>` or an aclfile line; one key pattern
    per prefix (CREDITGATE_KEY_PREFIX). Redis 7.2 and later also take
    `+client|setinfo`, which redis-py sends on connect and does without when refused.
    """
    patterns = " ".join(f"~{prefix}:*" for prefix in key_prefixes)
    commands = " ".join(f"+{command}" for command in REDIS_COMMANDS)
    return f"resetchannels resetkeys {patterns} -@all {commands}"
