"""A deterministic stream of license commands and charge requests for the fault runs.

Many organisations with licenses sized so that some run out (a mix of approvals and
rejections), admins and members, a disallowed user and a stranger per organisation,
exports, CRM pushes and verifications over small pools of contacts and companies (so
the 30-day window makes many items free), grants and new periods mid-stream, and a
share of request ids sent twice — some of them with another body.

Everything follows from the seed, so a failing run can be replayed. Only the
expectations of what was sent are kept (by ``Feeder``), never the whole stream: the
soak streams a million requests.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from creditgate.stream import topics as t

ADMIN, DISALLOWED, STRANGER = "u0", "u5", "x9"
MEMBERS = ("u1", "u2", "u3", "u4")

_ACTION_TOPICS = {
    "export": t.EXPORT_REQUESTS,
    "crm_push": t.PUSH_REQUESTS,
    "email_verification": t.VERIFICATION_REQUESTS,
}


def items_signature(items: Sequence[dict[str, Any]]) -> str:
    """Which items a body (or a result, whose items echo the body's) was about."""
    parts = [f"{i['type']}:{i['id']}:{i.get('company_id') or ''}" for i in items]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Send:
    """One message to produce; ``ident`` is its request_id or command_id."""

    kind: Literal["request", "command"]
    topic: str  # logical topic name
    org: str
    ident: str
    value: bytes
    items_sig: str = ""


@dataclass(frozen=True)
class WorkloadSpec:
    run: str  # makes every org, request and command id unique to this run
    requests: int
    orgs: int = 50
    seed: int = 1
    duplicate_fraction: float = 0.02  # request ids sent a second time
    conflict_fraction: float = 0.3  # of those, how many carry another body
    grants: int = 20  # credits.grant commands spread over the stream
    new_periods: int = 10  # license.start_period commands mid-stream
    unlicensed_orgs: int = 1  # organisations that never get a license


@dataclass
class _Org:
    org_id: str
    licensed: bool
    credits: int
    contacts: int
    companies: int
    period: int = 1


@dataclass
class Workload:
    """Builds the stream; iterate ``setup()`` first, wait for it, then ``stream()``."""

    spec: WorkloadSpec
    _orgs: list[_Org] = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        rng = random.Random(spec.seed)
        per_org = max(1, spec.requests // spec.orgs)
        # The pools bound what an organisation can ever be charged for (each entity
        # once per window, about half a credit per request here); licenses between an
        # eighth and two thirds of the requests per organisation leave some with
        # credits to spare and make others run out.
        contacts = max(20, per_org // 3)
        companies = max(5, contacts // 5)
        self._orgs = [
            _Org(
                org_id=f"{spec.run}-o{index:03d}",
                licensed=index >= spec.unlicensed_orgs,
                credits=rng.randint(max(1, per_org // 8), max(2, per_org * 2 // 3)),
                contacts=contacts,
                companies=companies,
            )
            for index in range(spec.orgs)
        ]

    @property
    def org_ids(self) -> list[str]:
        return [org.org_id for org in self._orgs]

    def setup(self) -> list[Send]:
        """License periods, members and the disallowed user: applied before any request."""
        now = datetime.now(UTC)
        sends = []
        for org in self._orgs:
            if org.licensed:
                sends.append(self._start_period(org, now))
            for user, role in ((ADMIN, "admin"), *((m, "member") for m in (*MEMBERS, DISALLOWED))):
                sends.append(
                    self._command(org, f"up-{user}", type="member.upsert", user_id=user, role=role)
                )
            sends.append(
                self._command(
                    org,
                    f"deny-{DISALLOWED}",
                    type="member.set_credits_allowed",
                    user_id=DISALLOWED,
                    allowed=False,
                    set_by=ADMIN,
                )
            )
        return sends

    def stream(self) -> Iterator[Send]:
        """The requests, with grants, new periods and repeated ids mixed in."""
        spec = self.spec
        rng = random.Random(spec.seed * 7919 + 1)
        total = spec.requests
        grant_at = {rng.randrange(total) for _ in range(spec.grants)}
        period_at = {rng.randrange(total) for _ in range(spec.new_periods)}
        # repeats wait in a heap until the stream has moved on by 1 to 500 requests, so
        # some land in the same worker batch as their first copy and some far after it
        later: list[tuple[int, int, Send]] = []
        for index in range(total):
            while later and later[0][0] <= index:
                yield heapq.heappop(later)[2]
            org = self._orgs[rng.randrange(len(self._orgs))]
            first, other = self._request(org, index, rng)
            yield first
            if rng.random() < spec.duplicate_fraction:
                repeat = other if rng.random() < spec.conflict_fraction else first
                heapq.heappush(later, (index + rng.randint(1, 500), index, repeat))
            if index in grant_at:
                yield self._grant(self._orgs[rng.randrange(len(self._orgs))], index, rng)
            if index in period_at:
                target = self._orgs[rng.randrange(len(self._orgs))]
                if target.licensed:
                    target.period += 1
                    yield self._start_period(target, datetime.now(UTC))
        while later:
            yield heapq.heappop(later)[2]

    # ---- building messages -----------------------------------------------------

    def _request(self, org: _Org, index: int, rng: random.Random) -> tuple[Send, Send]:
        """A request and a different body under the same request_id (for conflicts)."""
        roll = rng.random()
        user = DISALLOWED if roll < 0.08 else STRANGER if roll < 0.10 else ""
        user = user or rng.choice((ADMIN, *MEMBERS))
        roll = rng.random()
        action = "export" if roll < 0.5 else "crm_push" if roll < 0.8 else "email_verification"
        body: dict[str, Any] = {
            "request_id": f"{self.spec.run}-r{index}",
            "org_id": org.org_id,
            "user_id": user,
            "action": action,
            "requested_at": iso(datetime.now(UTC)),
        }
        if action == "email_verification":
            body["items"] = [self._contact(org, rng, with_company=False)]
            body["verified_email_found"] = rng.random() < 0.6
            other_items = [{"type": "contact", "id": f"{org.org_id}-cx{index}"}]
        else:
            items = [self._item(org, rng) for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.05:
                items.append(dict(items[0]))  # charged once: duplicate_in_request
            body["items"] = items
            if rng.random() < 0.2:
                body["on_insufficient"] = "partial"
            other_items = [*items, {"type": "company", "id": f"{org.org_id}-kx{index}"}]
        if rng.random() < 0.1:
            body["max_credits"] = rng.randint(0, len(body["items"]))
        if rng.random() < 0.3:
            body["reference"] = {"job": f"j{index % 97}"}
        other = {**body, "items": other_items}
        return self._request_send(body), self._request_send(other)

    @staticmethod
    def _request_send(body: dict[str, Any]) -> Send:
        return Send(
            "request",
            _ACTION_TOPICS[body["action"]],
            body["org_id"],
            body["request_id"],
            orjson.dumps(body),
            items_signature(body["items"]),
        )

    @staticmethod
    def _contact(org: _Org, rng: random.Random, *, with_company: bool) -> dict[str, Any]:
        # a skewed pick: popular contacts come back often, inside their window
        number = int(org.contacts * rng.random() ** 1.5)
        item: dict[str, Any] = {"type": "contact", "id": f"{org.org_id}-c{number}"}
        if with_company and rng.random() < 0.5:
            item["company_id"] = f"{org.org_id}-k{number % org.companies}"
        return item

    def _item(self, org: _Org, rng: random.Random) -> dict[str, Any]:
        if rng.random() < 0.7:
            return self._contact(org, rng, with_company=True)
        return {"type": "company", "id": f"{org.org_id}-k{rng.randrange(org.companies)}"}

    def _start_period(self, org: _Org, now: datetime) -> Send:
        return self._command(
            org,
            f"period-{org.period}",
            type="license.start_period",
            period_id=f"p{org.period}",
            starts_at=iso(now - timedelta(days=1)),
            ends_at=iso(now + timedelta(days=90)),
            credits=org.credits,
        )

    def _grant(self, org: _Org, index: int, rng: random.Random) -> Send:
        return self._command(
            org,
            f"grant-{index}",
            type="credits.grant",
            grant_id=f"g{index}",
            credits=rng.randint(10, 100),
            reason="fault-run top-up",
            granted_by="cs-bot",
        )

    def _command(self, org: _Org, name: str, **fields: Any) -> Send:
        command_id = f"{org.org_id}-{name}"
        body = {"command_id": command_id, "org_id": org.org_id, **fields}
        return Send("command", t.LICENSE_COMMANDS, org.org_id, command_id, orjson.dumps(body))
