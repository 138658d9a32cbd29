"""The index the worker's hold sweep reads: which organisations have holds to expire.

A hold expires at its ``expires_at`` whether or not traffic touches its organisation, so
the worker must find due holds without scanning the keyspace. Each organisation keeps
its holds by expiry (``OrgKeys.hold_expiries``, written by the charge script); this index
(``Keys.hold_sweep``, org_id -> its earliest expiry) says which organisations to look
at. It spans organisations, so no script may touch it (Redis Cluster: a script's keys
share one slot): the worker writes it here, beside the scripts, and it is only ever a
hint. An entry too early costs a look that finds nothing due; one missing would leave a
hold unexpired, so the worker notes every hold it publishes (replays too: a crash
between deciding a hold and noting it is answered by the replay), and healing notes the
holds it restores.

A Redis that forgot may also have kept a hold and lost its note: the script's write and
the note are two commands (on a cluster, on two nodes), and a restart or failover loses a
suffix of one node's writes. Such a note came before the ledger checkpoint was raised
past the hold's entry (a raise follows the batch's publication, the note precedes it),
so the lost suffix took the raise too, and the heal check that follows reads the hold's
entry again: for every organisation whose holds it reads there, it notes the earliest
expiry that organisation's own key holds (``note_from_expiries``).

An expired hold leaves its organisation's expiries only once its ``hold.expired`` is on
the broker (``expired``): a worker killed in between finds it again, and the script
answers with the expiry it stored (a replay), so it is published exactly as decided.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from creditgate.settings import Settings
from creditgate.store.client import RedisClient, redis_client
from creditgate.store.keys import Keys
from creditgate.store.outages import unavailable_as


class HoldSweepIndex:
    """Organisations with holds to expire, and their due holds."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> HoldSweepIndex:
        # one server or a cluster, as the store's (the index is one key, on one node)
        return cls(redis_client(settings), Keys(settings.key_prefix))

    async def close(self) -> None:
        await self._redis.aclose()

    async def note(self, due: Mapping[str, int]) -> None:
        """Per organisation, a hold that expires at ``due[org]`` (ms): the organisation is
        looked at by then (an earlier time already noted stays)."""
        if due:
            async with unavailable_as("noting holds to expire"):
                await self._redis.zadd(self._keys.hold_sweep, dict(due), lt=True)

    async def note_from_expiries(self, org_ids: Sequence[str]) -> None:
        """Note each organisation at its earliest hold expiry, read from its own expiries:
        the index may have forgotten a note its organisation's node kept (see the
        module; ``stream.healing`` calls this for the organisations whose holds it read
        in the ledger)."""
        if not org_ids:
            return
        async with unavailable_as("noting holds to expire"):
            pipe = self._redis.pipeline(transaction=False)
            for org_id in org_ids:
                pipe.zrange(self._keys.org(org_id).hold_expiries, 0, 0, withscores=True)
            nearest = await pipe.execute()
        await self.note(
            {org: int(found[0][1]) for org, found in zip(org_ids, nearest, strict=True) if found}
        )

    async def due(self, now_ms: int, orgs: int, holds: int) -> dict[str, list[str]]:
        """Up to ``orgs`` organisations due by ``now_ms``, each with up to ``holds`` of its
        holds due (possibly none: the index was early)."""
        async with unavailable_as("looking for holds to expire"):
            found: Any = await self._redis.zrangebyscore(
                self._keys.hold_sweep, "-inf", now_ms, start=0, num=orgs
            )
            if not found:
                return {}
            pipe = self._redis.pipeline(transaction=False)
            for org_id in found:
                pipe.zrangebyscore(
                    self._keys.org(org_id).hold_expiries, "-inf", now_ms, start=0, num=holds
                )
            per_org = await pipe.execute()
        return {str(org): [str(h) for h in ids] for org, ids in zip(found, per_org, strict=True)}

    async def expired(self, done: Mapping[str, Sequence[str]]) -> None:
        """The holds of ``done`` are expired and published (or were resolved otherwise):
        out of their organisation's expiries; each organisation is noted again at its
        next expiry, or leaves the index when it has none."""
        if not done:
            return
        async with unavailable_as("noting expired holds"):
            for org_id, request_ids in done.items():
                expiries = self._keys.org(org_id).hold_expiries
                if request_ids:
                    await self._redis.zrem(expiries, *request_ids)
                nearest: Any = await self._redis.zrange(expiries, 0, 0, withscores=True)
                if nearest:
                    await self._redis.zadd(self._keys.hold_sweep, {org_id: int(nearest[0][1])})
                else:
                    await self._redis.zrem(self._keys.hold_sweep, org_id)
