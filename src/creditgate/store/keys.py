"""Every Redis key creditgate uses, and the fields of its hashes, built in this module.

All keys of an organisation carry the hash tag ``{org_id}``: Redis Cluster hashes only
the part between the braces, so an organisation's keys share one slot and a Lua script
may touch all of them in one atomic call.

Python builds keys and fields only here (the store, ``store/restore.py``, the reports
through the store). The Lua scripts receive their keys as KEYS but spell the fields
themselves, so a change here must be mirrored there:

- usage fields (``UsageFields``): ``lua/charge.lua``'s ``count_usage``, which also
  writes the ``*users`` list and the ``<period>|<user>|*`` markers;
- record fields (``RECORD_*``): ``lua/charge.lua`` (a request's ``fp``, ``rec``,
  ``req``) and ``lua/command.lua`` (a command's ``fp``, ``rec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class OrgKeys:
    """The keys of one organisation under one prefix; each fixed one is built once per
    object (the store keeps the objects of recent organisations)."""

    prefix: str
    org_id: str

    @cached_property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.org_id}}}"

    @cached_property
    def license(self) -> str:
        return f"{self.base}:license"

    @cached_property
    def members(self) -> str:
        return f"{self.base}:members"

    @cached_property
    def disallowed(self) -> str:
        return f"{self.base}:disallowed"

    @cached_property
    def sequence(self) -> str:
        return f"{self.base}:seq"

    @cached_property
    def usage(self) -> str:
        return f"{self.base}:usage"

    @cached_property
    def grants(self) -> str:
        return f"{self.base}:grants"

    @cached_property
    def limits(self) -> str:
        """Members' credit limits per period: a hash, user_id -> credits (none: no limit)."""
        return f"{self.base}:limits"

    @cached_property
    def holds(self) -> str:
        """Open holds: a hash, request_id -> the hold (JSON), gone once it is resolved."""
        return f"{self.base}:holds"

    @cached_property
    def hold_expiries(self) -> str:
        """Holds not yet resolved by expiry: a zset of request_ids by expiry (ms)."""
        return f"{self.base}:hold-exp"

    def request(self, request_id: str) -> str:
        return f"{self.base}:req:{request_id}"

    def settlement(self, settlement_id: str) -> str:
        """A hold's settlement or release: its stored outcome (``fp``, ``rec``)."""
        return f"{self.base}:stl:{settlement_id}"

    def command(self, command_id: str) -> str:
        return f"{self.base}:cmd:{command_id}"

    def history(self, user_id: str, action: str) -> str:
        return f"{self.base}:hist:{action}:{user_id}"

    def window(self, name: str) -> str:
        """A repeat window; ``name`` is ``domain.windows.window_name(kind, entity_id)``."""
        return f"{self.base}:win:{name}"


@dataclass(frozen=True)
class Keys:
    prefix: str = "cg"

    def org(self, org_id: str) -> OrgKeys:
        return OrgKeys(self.prefix, org_id)

    def route(self, org_id: str) -> str:
        """A key of the organisation's slot: where a Redis Cluster runs its scripts."""
        return f"{self.prefix}:{{{org_id}}}"

    @property
    def hold_sweep(self) -> str:
        """The organisations with holds to expire (a zset, org_id -> the earliest expiry,
        ms), for the worker's sweep (``store.holds``). It belongs to no organisation, so
        it has no hash tag; the scripts never touch it."""
        return f"{self.prefix}:hold-sweep"

    @property
    def ledger_checkpoint(self) -> str:
        """The ledger checkpoint (a sorted set, ``<ledger topic>:<partition>`` scored by
        offset): every ledger entry below the offset is known to be in Redis
        (``stream.healing``). It belongs to no organisation, so it has no hash tag; a Redis
        Cluster keeps one copy per node, each named after this one (``store.cluster``)."""
        return f"{self.prefix}:ledger-checkpoint"

    def org_pattern(self, org_id: str = "*") -> str:
        """A SCAN pattern for an organisation's keys (tests and rebuilds, not the hot path)."""
        return f"{self.prefix}:{{{org_id}}}:*"


# ---- hash fields -------------------------------------------------------------------

# The fields of a stored decision (a request's hash) or applied command (a command's):
# the body's fingerprint, the record as the script returned it, and, for a request,
# its summary as reports show it.
RECORD_FINGERPRINT = "fp"
RECORD = "rec"
RECORD_REQUEST = "req"
# a refunded request's refunded items (JSON, 1-based item indexes), written by
# ``lua/command.lua``'s refund beside the stored decision, which stays as decided
RECORD_REFUNDED = "ref"
# a hold's resolution (the settle, release or expiry record), written by
# ``lua/charge.lua`` beside the hold's stored decision
RECORD_RESOLUTION = "res"

# Usage metrics counted per period, user and action. What a member's credit limit
# counts is credits + held - refunded over every action (``lua/charge.lua``).
USAGE_METRICS = ("credits", "requests", "saved", "rejected", "refunded", "held")

# A member's "credit limit reached" notification of the period is remembered on the
# license hash (which a new period replaces) under this prefix and the user id, as
# ``insufficient_notified`` is: ``lua/charge.lua``, ``store/restore.py``.
LIMIT_NOTIFIED_PREFIX = "uln:"


class UsageFields:
    """The fields of an organisation's usage hash. Counters are
    ``<period>|<user>|<action>|<metric>``; per period, ``<period>|*users`` lists its
    users (comma-separated, in order of first use) and ``<period>|<user>|*`` marks a user
    listed. ``*`` is never in an id, so no counter is taken for a list or a marker."""

    USERS_SUFFIX = "|*users"

    @staticmethod
    def counter(period_id: str, user_id: str, action: str, metric: str) -> str:
        return f"{period_id}|{user_id}|{action}|{metric}"

    @staticmethod
    def counter_prefix(period_id: str, user_id: str, action: str) -> str:
        """A counter's field but its metric: ``counter_prefix(...) + metric``."""
        return f"{period_id}|{user_id}|{action}|"

    @classmethod
    def users(cls, period_id: str) -> str:
        return f"{period_id}{cls.USERS_SUFFIX}"

    @staticmethod
    def user_marker(period_id: str, user_id: str) -> str:
        return f"{period_id}|{user_id}|*"

    @staticmethod
    def period_and_user(counter: str) -> tuple[str, str]:
        """The period and the user of a counter's field."""
        period, user = counter.split("|")[:2]
        return period, user

    @classmethod
    def is_users(cls, field: str) -> bool:
        """Whether ``field`` is a period's user list (every other field is a number)."""
        return field.endswith(cls.USERS_SUFFIX)
