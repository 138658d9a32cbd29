"""Every Redis key creditgate uses, built in this one module.

All keys of an organisation carry the hash tag ``{org_id}``: Redis Cluster hashes only
the part between the braces, so an organisation's keys share one slot and a Lua script
may touch all of them in one atomic call.
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

    def request(self, request_id: str) -> str:
        return f"{self.base}:req:{request_id}"

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

    @property
    def ledger_checkpoint(self) -> str:
        """The ledger checkpoint (a hash, ``<ledger topic>:<partition>`` -> offset): every
        ledger entry below the offset is known to be in Redis (``stream.healing``). It
        belongs to no organisation, so it has no hash tag."""
        return f"{self.prefix}:ledger-checkpoint"

    def org_pattern(self, org_id: str = "*") -> str:
        """A SCAN pattern for an organisation's keys (tests and rebuilds, not the hot path)."""
        return f"{self.prefix}:{{{org_id}}}:*"
