"""A realistic, reproducible mix of organisations and charge requests.

Everything is derived from one seed, so two runs with the same flags produce the same
bytes. The shape follows the platform's traffic as the issue describes it:

- organisations of Zipf-skewed size: a few large customers send most requests, and
  have more users;
- exports (1 item, or 100 in the mixed workload), CRM pushes and email verifications;
- about 20 % of items repeat an entity the organisation already paid for inside the
  repeat window (free repeats), plus a few exact redeliveries of a request;
- some friction: a disallowed user in a few organisations, a few non-members, and
  small organisations whose balance runs out (insufficient credits, notifications).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from creditgate.domain.charges import Action
from creditgate.stream import topics as t

TOPIC_OF = {action: logical for logical, action in t.REQUEST_ACTIONS.items()}

# Shares of the traffic, by action.
ACTION_SHARES = ((Action.EXPORT, 0.5), (Action.CRM_PUSH, 0.3), (Action.EMAIL_VERIFICATION, 0.2))


@dataclass(frozen=True)
class WorkloadSpec:
    seed: int = 42
    orgs: int = 300
    zipf_s: float = 1.1
    repeat_share: float = 0.2
    redelivery_share: float = 0.005
    non_member_share: float = 0.002
    big_export_share: float = 0.0  # share of exports that carry 100 items
    big_export_items: int = 100
    small_plan_credits: int = 2_000


@dataclass
class Org:
    org_id: str
    weight: float
    users: list[str]
    credits: int
    disallowed: str | None
    # entities already charged (export/push share them) and contacts verified
    charged: list[tuple[str, str, str | None]] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    next_entity: int = 0


@dataclass(frozen=True)
class Request:
    topic: str  # logical topic name
    key: bytes
    value: bytes
    request_id: str


class Workload:
    """Organisations (their license commands) and an endless stream of requests."""

    def __init__(self, spec: WorkloadSpec, run_id: str) -> None:
        self.spec = spec
        self.run_id = run_id
        self._rng = random.Random(spec.seed)
        self.orgs = self._make_orgs()
        self._weights = [org.weight for org in self.orgs]
        self._sent: list[Request] = []
        self._count = 0
        # a fixed time: the same seed gives the same bytes
        self._requested_at = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)

    def _make_orgs(self) -> list[Org]:
        rng, spec = self._rng, self.spec
        orgs = []
        for rank in range(1, spec.orgs + 1):
            weight = 1.0 / rank**spec.zipf_s
            n_users = max(2, min(300, int(300 * weight)))
            users = [f"u-{i}" for i in range(n_users)]
            # the smallest tenth of the organisations run on small plans and run out
            credits = spec.small_plan_credits if rank > spec.orgs * 0.9 else 1_000_000_000
            disallowed = users[-1] if rng.random() < 0.05 else None
            orgs.append(Org(f"org-{rank:04d}", weight, users, credits, disallowed))
        return orgs

    def license_commands(self, period_ends: datetime) -> list[dict[str, Any]]:
        """Commands that give every organisation a period, members and an admin."""
        starts = (period_ends - timedelta(days=400)).isoformat()
        commands: list[dict[str, Any]] = []
        for org in self.orgs:
            commands.append(
                {
                    "command_id": f"{self.run_id}-{org.org_id}-period",
                    "org_id": org.org_id,
                    "type": "license.start_period",
                    "period_id": "bench",
                    "starts_at": starts,
                    "ends_at": period_ends.isoformat(),
                    "credits": org.credits,
                }
            )
            for i, user in enumerate(org.users):
                commands.append(
                    {
                        "command_id": f"{self.run_id}-{org.org_id}-member-{user}",
                        "org_id": org.org_id,
                        "type": "member.upsert",
                        "user_id": user,
                        "role": "admin" if i == 0 else "member",
                    }
                )
            if org.disallowed:
                commands.append(
                    {
                        "command_id": f"{self.run_id}-{org.org_id}-disallow",
                        "org_id": org.org_id,
                        "type": "member.set_credits_allowed",
                        "user_id": org.disallowed,
                        "allowed": False,
                        "set_by": org.users[0],
                    }
                )
        return commands

    def requests(self, count: int) -> Iterator[Request]:
        for _ in range(count):
            yield self.next_request()

    def next_request(self) -> Request:
        rng, spec = self._rng, self.spec
        if self._sent and rng.random() < spec.redelivery_share:
            # a producer's retry: the same bytes again (the stored decision is re-emitted)
            return rng.choice(self._sent[-10_000:])
        org = rng.choices(self.orgs, self._weights)[0]
        action = _pick_action(rng.random())
        user = org.users[rng.randrange(len(org.users))]
        if rng.random() < spec.non_member_share:
            user = "u-stranger"
        self._count += 1
        request_id = f"{self.run_id}-{self._count}"
        body: dict[str, Any] = {
            "request_id": request_id,
            "org_id": org.org_id,
            "user_id": user,
            "action": action.value,
            "requested_at": self._requested_at.isoformat().replace("+00:00", "Z"),
        }
        if action is Action.EMAIL_VERIFICATION:
            contact = self._verification_contact(org)
            body["items"] = [{"type": "contact", "id": contact}]
            body["verified_email_found"] = rng.random() < 0.7
        else:
            big = action is Action.EXPORT and rng.random() < spec.big_export_share
            n_items = spec.big_export_items if big else 1
            body["items"] = [self._export_item(org) for _ in range(n_items)]
            if rng.random() < 0.5:
                body["max_credits"] = n_items
            if rng.random() < 0.3:
                body["reference"] = {"export_id": f"e-{self._count}", "crm": "hubspot"}
        request = Request(TOPIC_OF[action], org.org_id.encode(), orjson.dumps(body), request_id)
        self._sent.append(request)
        if len(self._sent) > 20_000:
            del self._sent[:10_000]
        return request

    def _new_entity(self, org: Org, prefix: str) -> str:
        org.next_entity += 1
        return f"{prefix}-{org.org_id[4:]}-{org.next_entity}"

    def _export_item(self, org: Org) -> dict[str, Any]:
        rng = self._rng
        if org.charged and rng.random() < self.spec.repeat_share:
            kind, entity, company = rng.choice(org.charged)
        elif rng.random() < 0.7:
            kind, entity = "contact", self._new_entity(org, "c")
            company = self._new_entity(org, "co") if rng.random() < 0.5 else None
            _remember(org.charged, (kind, entity, company))
        else:
            kind, entity, company = "company", self._new_entity(org, "co"), None
            _remember(org.charged, (kind, entity, company))
        item: dict[str, Any] = {"type": kind, "id": entity}
        if company:
            item["company_id"] = company
        return item

    def _verification_contact(self, org: Org) -> str:
        if org.verified and self._rng.random() < self.spec.repeat_share:
            return self._rng.choice(org.verified)
        contact = self._new_entity(org, "c")
        _remember(org.verified, contact)
        return contact


def _remember(seen: list[Any], value: Any) -> None:
    # bounded memory: repeats come from the most recent few thousand entities
    seen.append(value)
    if len(seen) > 4_000:
        del seen[:2_000]


def _pick_action(roll: float) -> Action:
    for action, share in ACTION_SHARES:
        if roll < share:
            return action
        roll -= share
    return ACTION_SHARES[-1][0]
