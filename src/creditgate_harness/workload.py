"""The one workload generator: license commands and charge requests, all from a seed.

Everything follows from the spec (its seed included), so a failing run can be replayed
and two benchmark runs with the same flags produce the same bytes. Only what is sent
is built, one message at a time: the soak streams a million requests. The spec's
``shape`` chooses the traffic:

``"faults"`` (the fault tests and ``bench.soak``): a finite stream of
``spec.requests``. Organisations of one size (a few unlicensed), an admin, four members,
a disallowed user and a stranger each; licenses sized so that some run out (a mix of
approvals and rejections); exports, CRM pushes and verifications over small pools of
contacts and companies (so the 30-day window makes many items free); grants and new
periods mid-stream, and a share of request ids sent twice, some of them with another
body. Times are the wall clock's.

``"bench"`` (``bench.run``, ``bench.micro``, ``bench.equivalence``; ``WorkloadSpec.bench``):
an endless stream of requests, the platform's traffic as the issue describes it.
Organisations of Zipf-skewed size (a few large customers send most requests and have
more users); exports (1 item, or ``big_export_items`` for ``big_export_share`` of them),
CRM pushes and email verifications; about ``repeat_share`` of the items repeat an entity
the organisation already paid for (free repeats), plus exact redeliveries of a request;
a disallowed user in a few organisations, a few non-members, and small organisations
whose balance runs out. One fixed request time, so the bytes depend on the seed only.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from creditgate.domain.charges import Action
from creditgate.stream import topics as t

Shape = Literal["faults", "bench"]

# the "faults" shape's users, the same in every organisation
ADMIN, DISALLOWED, STRANGER = "u0", "u5", "x9"
MEMBERS = ("u1", "u2", "u3", "u4")

TOPIC_OF = {action: logical for logical, action in t.REQUEST_ACTIONS.items()}

# the "bench" shape's shares of the traffic, by action
ACTION_SHARES = ((Action.EXPORT, 0.5), (Action.CRM_PUSH, 0.3), (Action.EMAIL_VERIFICATION, 0.2))
# the "bench" shape's one request time: the same seed gives the same bytes
BENCH_REQUESTED_AT = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


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
    items_sig: str = ""  # "faults" shape only: the invariants need it, the benchmark not

    @property
    def key(self) -> bytes:
        """The record key: the organisation, as every producer of requests keys them."""
        return self.org.encode()


# what the "bench" shape reads, in the order benchmark reports list them
BENCH_OPTIONS = (
    "seed",
    "orgs",
    "zipf_s",
    "repeat_share",
    "redelivery_share",
    "non_member_share",
    "big_export_share",
    "big_export_items",
    "small_plan_credits",
)


@dataclass(frozen=True)
class WorkloadSpec:
    run: str  # makes the run's request and command ids (and fault orgs) its own
    requests: int = 0  # "faults": the stream's length; "bench": endless, unused
    shape: Shape = "faults"
    orgs: int = 50
    seed: int = 1
    # ---- "faults" ----
    duplicate_fraction: float = 0.02  # request ids sent a second time
    conflict_fraction: float = 0.3  # of those, how many carry another body
    grants: int = 20  # credits.grant commands spread over the stream
    new_periods: int = 10  # license.start_period commands mid-stream
    unlicensed_orgs: int = 1  # organisations that never get a license
    # ---- "bench" ----
    zipf_s: float = 1.1
    repeat_share: float = 0.2
    redelivery_share: float = 0.005  # the same bytes again (a producer's retry)
    non_member_share: float = 0.002
    big_export_share: float = 0.0  # share of exports that carry big_export_items
    big_export_items: int = 100
    small_plan_credits: int = 2_000

    def bench_options(self) -> dict[str, Any]:
        """The options of the "bench" shape, as a benchmark report records them."""
        return {name: getattr(self, name) for name in BENCH_OPTIONS}

    @classmethod
    def bench(cls, run: str, **options: Any) -> WorkloadSpec:
        """The benchmark's traffic, with its defaults (300 organisations, seed 42)."""
        return cls(run=run, shape="bench", **{"orgs": 300, "seed": 42, **options})


@dataclass
class _Org:
    org_id: str
    credits: int
    users: tuple[str, ...]  # the first is the admin
    disallowed: str | None
    licensed: bool = True
    weight: float = 1.0  # "bench": how much of the traffic is this organisation's
    # "faults": the pools of contacts and companies requests pick from
    contacts: int = 0
    companies: int = 0
    period: int = 1
    # "bench": entities already charged (export and push share them), contacts verified
    charged: list[tuple[str, str, str | None]] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    next_entity: int = 0


@dataclass
class Workload:
    """Send ``setup()`` first and wait for it, then ``stream()`` (or ``requests(n)``)."""

    spec: WorkloadSpec
    _orgs: list[_Org] = field(init=False)
    _rng: random.Random = field(init=False)
    _stream: Iterator[Send] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.spec.seed)
        self._orgs = self._bench_orgs() if self.spec.shape == "bench" else self._fault_orgs()
        self._weights = [org.weight for org in self._orgs]
        self._sent: list[Send] = []  # "bench": recent requests, to redeliver
        self._count = 0

    @property
    def org_ids(self) -> list[str]:
        return [org.org_id for org in self._orgs]

    # ---- organisations -----------------------------------------------------------

    def _fault_orgs(self) -> list[_Org]:
        spec, rng = self.spec, self._rng
        per_org = max(1, spec.requests // spec.orgs)
        # The pools bound what an organisation can ever be charged for (each entity
        # once per window, about half a credit per request here); licenses between an
        # eighth and two thirds of the requests per organisation leave some with
        # credits to spare and make others run out.
        contacts = max(20, per_org // 3)
        return [
            _Org(
                org_id=f"{spec.run}-o{index:03d}",
                licensed=index >= spec.unlicensed_orgs,
                credits=rng.randint(max(1, per_org // 8), max(2, per_org * 2 // 3)),
                users=(ADMIN, *MEMBERS, DISALLOWED),
                disallowed=DISALLOWED,
                contacts=contacts,
                companies=max(5, contacts // 5),
            )
            for index in range(spec.orgs)
        ]

    def _bench_orgs(self) -> list[_Org]:
        spec, rng = self.spec, self._rng
        orgs = []
        for rank in range(1, spec.orgs + 1):
            weight = 1.0 / rank**spec.zipf_s
            users = tuple(f"u-{i}" for i in range(max(2, min(300, int(300 * weight)))))
            # the smallest tenth of the organisations run on small plans and run out
            credits = spec.small_plan_credits if rank > spec.orgs * 0.9 else 1_000_000_000
            disallowed = users[-1] if rng.random() < 0.05 else None
            orgs.append(_Org(f"org-{rank:04d}", credits, users, disallowed, weight=weight))
        return orgs

    # ---- set-up ------------------------------------------------------------------

    def setup(self, now: datetime | None = None) -> list[Send]:
        """License periods, members and disallowed users: applied before any request."""
        now = now or datetime.now(UTC)
        sends = []
        for org in self._orgs:
            if org.licensed:
                sends.append(self._start_period(org, now))
            for i, user in enumerate(org.users):
                role = "admin" if i == 0 else "member"
                name = f"up-{user}" if self.spec.shape == "faults" else f"member-{user}"
                sends.append(
                    self._command(org, name, type="member.upsert", user_id=user, role=role)
                )
            if org.disallowed:
                sends.append(
                    self._command(
                        org,
                        f"deny-{org.disallowed}" if self.spec.shape == "faults" else "disallow",
                        type="member.set_credits_allowed",
                        user_id=org.disallowed,
                        allowed=False,
                        set_by=org.users[0],
                    )
                )
        return sends

    def _start_period(self, org: _Org, now: datetime) -> Send:
        if self.spec.shape == "bench":
            # one long period, from well before the fixed request time to a year ahead
            ends = now + timedelta(days=365)
            name, period_id = "period", "bench"
            starts_at, ends_at = (ends - timedelta(days=400)).isoformat(), ends.isoformat()
        else:
            name, period_id = f"period-{org.period}", f"p{org.period}"
            starts_at, ends_at = iso(now - timedelta(days=1)), iso(now + timedelta(days=90))
        return self._command(
            org,
            name,
            type="license.start_period",
            period_id=period_id,
            starts_at=starts_at,
            ends_at=ends_at,
            credits=org.credits,
        )

    def _command(self, org: _Org, name: str, **fields: Any) -> Send:
        # the fault shape's organisations carry the run in their id, the benchmark's not
        prefix = org.org_id if self.spec.shape == "faults" else f"{self.spec.run}-{org.org_id}"
        command_id = f"{prefix}-{name}"
        body = {"command_id": command_id, "org_id": org.org_id, **fields}
        return Send("command", t.LICENSE_COMMANDS, org.org_id, command_id, orjson.dumps(body))

    # ---- the stream --------------------------------------------------------------

    def stream(self) -> Iterator[Send]:
        """The messages after the set-up: finite ("faults"), endless ("bench")."""
        return self._bench_stream() if self.spec.shape == "bench" else self._fault_stream()

    def requests(self, count: int) -> Iterator[Send]:
        """The next ``count`` messages of one stream kept across calls (the benchmark's
        inputs: each measurement takes requests the one before did not)."""
        if self._stream is None:
            self._stream = self.stream()
        return itertools.islice(self._stream, count)

    # ---- "faults" ----------------------------------------------------------------

    def _fault_stream(self) -> Iterator[Send]:
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
            first, other = self._fault_request(org, index, rng)
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

    def _fault_request(self, org: _Org, index: int, rng: random.Random) -> tuple[Send, Send]:
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
            body["items"] = [self._pool_contact(org, rng, with_company=False)]
            body["verified_email_found"] = rng.random() < 0.6
            other_items = [{"type": "contact", "id": f"{org.org_id}-cx{index}"}]
        else:
            items = [self._pool_item(org, rng) for _ in range(rng.randint(1, 4))]
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
        return self._request_send(body, signed=True), self._request_send(other, signed=True)

    @staticmethod
    def _pool_contact(org: _Org, rng: random.Random, *, with_company: bool) -> dict[str, Any]:
        # a skewed pick: popular contacts come back often, inside their window
        number = int(org.contacts * rng.random() ** 1.5)
        item: dict[str, Any] = {"type": "contact", "id": f"{org.org_id}-c{number}"}
        if with_company and rng.random() < 0.5:
            item["company_id"] = f"{org.org_id}-k{number % org.companies}"
        return item

    def _pool_item(self, org: _Org, rng: random.Random) -> dict[str, Any]:
        if rng.random() < 0.7:
            return self._pool_contact(org, rng, with_company=True)
        return {"type": "company", "id": f"{org.org_id}-k{rng.randrange(org.companies)}"}

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

    # ---- "bench" -----------------------------------------------------------------

    def _bench_stream(self) -> Iterator[Send]:
        while True:
            yield self._bench_request()

    def _bench_request(self) -> Send:
        rng, spec = self._rng, self.spec
        if self._sent and rng.random() < spec.redelivery_share:
            # a producer's retry: the same bytes again (the stored decision is re-emitted)
            return rng.choice(self._sent[-10_000:])
        org = rng.choices(self._orgs, self._weights)[0]
        action = _pick_action(rng.random())
        user = org.users[rng.randrange(len(org.users))]
        if rng.random() < spec.non_member_share:
            user = "u-stranger"
        self._count += 1
        body: dict[str, Any] = {
            "request_id": f"{spec.run}-{self._count}",
            "org_id": org.org_id,
            "user_id": user,
            "action": action.value,
            "requested_at": BENCH_REQUESTED_AT.isoformat().replace("+00:00", "Z"),
        }
        if action is Action.EMAIL_VERIFICATION:
            body["items"] = [{"type": "contact", "id": self._verification_contact(org)}]
            body["verified_email_found"] = rng.random() < 0.7
        else:
            big = action is Action.EXPORT and rng.random() < spec.big_export_share
            n_items = spec.big_export_items if big else 1
            body["items"] = [self._export_item(org) for _ in range(n_items)]
            if rng.random() < 0.5:
                body["max_credits"] = n_items
            if rng.random() < 0.3:
                body["reference"] = {"export_id": f"e-{self._count}", "crm": "hubspot"}
        # unsigned: nothing checks the benchmark's decisions against what was sent
        request = self._request_send(body, signed=False)
        self._sent.append(request)
        if len(self._sent) > 20_000:
            del self._sent[:10_000]
        return request

    def _new_entity(self, org: _Org, prefix: str) -> str:
        org.next_entity += 1
        return f"{prefix}-{org.org_id[4:]}-{org.next_entity}"

    def _export_item(self, org: _Org) -> dict[str, Any]:
        rng = self._rng
        company: str | None
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

    def _verification_contact(self, org: _Org) -> str:
        if org.verified and self._rng.random() < self.spec.repeat_share:
            return self._rng.choice(org.verified)
        contact = self._new_entity(org, "c")
        _remember(org.verified, contact)
        return contact

    # ---- both --------------------------------------------------------------------

    @staticmethod
    def _request_send(body: dict[str, Any], *, signed: bool) -> Send:
        return Send(
            "request",
            TOPIC_OF[Action(body["action"])],
            body["org_id"],
            body["request_id"],
            orjson.dumps(body),
            items_signature(body["items"]) if signed else "",
        )


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
