"""``creditgate demo``: a scripted scenario through the real pipeline, with a report.

Brings up the local stack unless one is configured, applies the topics under a
prefix of its own, runs ``creditgate worker`` as a separate process, publishes
license commands and charge requests with a plain Kafka client and prints each
decision and the notifications it sent. To show a repeat window ending it restarts
the worker with the decision clock 31 days ahead.

The worker has API tokens of the demo's own (a member, an admin, support): the demo ends
by printing the console's address and the tokens to sign in with. ``--keep`` leaves the
stack and the worker running until Ctrl-C, so the screens can be looked at with the
demo's data.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from creditgate.errors import CreditgateError
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient
from creditgate.stream.topics import TopicRegistry, apply_topics

ORG = "acme"
DAY = timedelta(days=1)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@contextmanager
def _stack() -> Iterator[tuple[str, str]]:
    """The configured stack, or a throwaway local one that is gone afterwards."""
    if os.environ.get("CREDITGATE_KAFKA_BOOTSTRAP") and os.environ.get("CREDITGATE_REDIS_URL"):
        settings = Settings()
        yield settings.kafka_bootstrap, settings.redis_url.get_secret_value()
        return
    from creditgate.devstack import DevStack  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="creditgate-demo-") as root:
        stack = DevStack(Path(root))
        print("starting a local Kafka (KRaft) and Redis …", flush=True)
        try:
            endpoints = stack.up()
            yield endpoints.kafka_bootstrap, endpoints.redis_url
        finally:
            stack.down()


class _Worker:
    """``creditgate worker`` in a child process, restartable with another clock."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._env = env
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, clock_offset_days: float = 0) -> None:
        env = {**self._env, "CREDITGATE_CLOCK_OFFSET_SECONDS": str(clock_offset_days * 86400)}
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "creditgate", "worker", "--loglevel", "warning"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


class _Report:
    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []

    @staticmethod
    def title(text: str) -> None:
        print(f"\n▸ {text}", flush=True)

    @staticmethod
    def event(event: dict[str, Any]) -> None:
        print(f"    {event['command_type']:<28} {event['type']:<17} {event['message']}")

    @staticmethod
    def result(what: str, result: dict[str, Any]) -> None:
        verdicts = {
            "charge.approved": "approved",
            "charge.held": "held",
            "hold.settled": "settled",
            "hold.released": "released",
            "hold.expired": "expired",
        }
        verdict = verdicts.get(result["type"], "REJECTED")
        reason = f" ({result['reason']})" if result["reason"] else ""
        print(f"    {what:<44} {verdict}{reason}")
        held = f", held {result['credits_held']}" if "credits_held" in result else ""
        print(
            f"        credits charged {result['credits_charged']}{held}, balance after "
            f"{result['balance_after']} — {result['message']}"
        )
        for item in result["items"]:
            until = f" until {item['free_until'][:10]}" if "free_until" in item else ""
            print(f"          {item['type']:<8} {item['id']:<6} {item['outcome']}{until}")


async def _scenario(client: CreditgateClient, worker: _Worker, report: _Report) -> None:
    now = datetime.now(UTC)
    counter = iter(range(1, 1000))

    def request(
        user: str, action: str, items: list[dict[str, Any]], **extra: Any
    ) -> dict[str, Any]:
        return {
            "request_id": f"req-{next(counter):03d}",
            "org_id": ORG,
            "user_id": user,
            "action": action,
            "items": items,
            "requested_at": _iso(datetime.now(UTC)),
            **extra,
        }

    def command(kind: str, **fields: Any) -> dict[str, Any]:
        return {"command_id": f"cmd-{next(counter):03d}", "org_id": ORG, "type": kind, **fields}

    async def charge(what: str, body: dict[str, Any]) -> dict[str, Any]:
        result = await client.request(body, timeout=60)
        report.result(what, result)
        return result

    report.title("A license of 5 credits; ana is admin, bob and cid are members")
    for body in (
        command(
            "license.start_period",
            period_id="2026-Q4",
            credits=5,
            starts_at=_iso(now - DAY),
            ends_at=_iso(now + 60 * DAY),
        ),
        command("member.upsert", user_id="ana", role="admin"),
        command("member.upsert", user_id="bob", role="member"),
        command("member.upsert", user_id="cid", role="member"),
    ):
        report.event(await client.command(body, timeout=60))

    report.title("bob exports a contact with its company, then pushes it to the CRM")
    await charge(
        "export c-1 (with company co-9)",
        request(
            "bob",
            "export",
            [{"type": "contact", "id": "c-1", "company_id": "co-9"}],
            max_credits=1,
            reference={"export_id": "e-1"},
        ),
    )
    await charge(
        "push c-1 and company co-9 to hubspot",
        request(
            "bob",
            "crm_push",
            [{"type": "contact", "id": "c-1"}, {"type": "company", "id": "co-9"}],
            reference={"crm": "hubspot"},
        ),
    )

    report.title("Email verification costs a credit only when a verified email is found")
    await charge(
        "verify c-2: verified email found",
        request(
            "bob",
            "email_verification",
            [{"type": "contact", "id": "c-2"}],
            verified_email_found=True,
        ),
    )
    await charge(
        "verify c-3: none found",
        request(
            "bob",
            "email_verification",
            [{"type": "contact", "id": "c-3"}],
            verified_email_found=False,
        ),
    )

    report.title("ana disallows cid; cid tries to export")
    report.event(
        await client.command(
            command("member.set_credits_allowed", user_id="cid", allowed=False, set_by="ana"),
            timeout=60,
        )
    )
    report.event(
        await client.command(
            command("member.set_credits_allowed", user_id="ana", allowed=False, set_by="bob"),
            timeout=60,
        )
    )
    await charge("cid exports c-4", request("cid", "export", [{"type": "contact", "id": "c-4"}]))

    big = [{"type": "contact", "id": f"c-{n}"} for n in range(10, 15)]
    report.title("An export larger than the balance: all or nothing, then partial")
    await charge("export 5 contacts", request("bob", "export", big))
    await charge(
        "export 5 contacts, on_insufficient=partial",
        request("bob", "export", big, on_insufficient="partial"),
    )

    report.title("Customer success tops up 10 credits")
    report.event(
        await client.command(
            command(
                "credits.grant",
                grant_id="g-1",
                credits=10,
                reason="renewal bridge",
                granted_by="cs-mia",
            ),
            timeout=60,
        )
    )

    report.title("31 days later (worker restarted with the clock 31 days ahead)")
    worker.stop()
    worker.start(clock_offset_days=31)
    await charge(
        "push c-1 again: its window has ended",
        request("bob", "crm_push", [{"type": "contact", "id": "c-1"}]),
    )
    await charge(
        "export c-1: inside the window just opened",
        request("bob", "export", [{"type": "contact", "id": "c-1"}]),
    )

    report.title("A new license period of 20 credits: nothing rolls over")
    shifted = now + 31 * DAY
    report.event(
        await client.command(
            command(
                "license.start_period",
                period_id="2027-Q1",
                credits=20,
                starts_at=_iso(shifted - timedelta(hours=1)),
                ends_at=_iso(shifted + 90 * DAY),
            ),
            timeout=60,
        )
    )
    await charge("export c-30", request("bob", "export", [{"type": "contact", "id": "c-30"}]))

    report.title("An export of only the contacts with a verified email: hold, then settle")
    wanted = [{"type": "contact", "id": f"c-{n}"} for n in range(40, 44)]
    held = await charge(
        "hold the most it can cost: 4 contacts",
        request("bob", "export", wanted, hold={"expires_in_seconds": 600}),
    )
    settled = await client.settlement(
        {
            "settlement_id": "stl-001",
            "org_id": ORG,
            "request_id": held["request_id"],
            "type": "hold.settle",
            "items": [wanted[0], wanted[2]],  # the two with a verified email
        },
        timeout=60,
    )
    report.result("settle: c-40 and c-42 were exported", settled)

    report.title("ana allows cid again, with a limit of 1 credit this period")
    for body in (
        command("member.set_credits_allowed", user_id="cid", allowed=True, set_by="ana"),
        command("member.set_credit_limit", user_id="cid", limit=1, set_by="ana"),
    ):
        report.event(await client.command(body, timeout=60))
    two = [{"type": "contact", "id": "c-60"}, {"type": "contact", "id": "c-61"}]
    await charge("cid exports 2 contacts", request("cid", "export", two))
    await charge(
        "cid exports them, on_insufficient=partial",
        request("cid", "export", two, on_insufficient="partial"),
    )

    report.title("The CRM refuses one contact of a push: customer success refunds it")
    pushed = await charge(
        "push c-70 and c-71 to hubspot",
        request(
            "bob",
            "crm_push",
            [{"type": "contact", "id": "c-70"}, {"type": "contact", "id": "c-71"}],
        ),
    )
    refund = command(
        "charge.refund",
        request_id=pushed["request_id"],
        items=[{"type": "contact", "id": "c-71"}],
        reason="hubspot refused c-71",
        refunded_by="cs-mia",
    )
    report.event(await client.command(refund, timeout=60))
    await charge(
        "push c-71 again: charged again (window closed)",
        request("bob", "crm_push", [{"type": "contact", "id": "c-71"}]),
    )


async def _play(bootstrap: str, registry: TopicRegistry, worker: _Worker) -> _Report:
    await apply_topics(bootstrap, registry)
    report = _Report()
    async with CreditgateClient(bootstrap, registry) as client:
        worker.start()
        await _scenario(client, worker, report)
        await asyncio.sleep(0.5)  # let the last notifications arrive before listing them
        report.notifications = list(client.seen[t.NOTIFICATIONS])
    return report


def demo_tokens() -> dict[str, tuple[str, dict[str, str]]]:
    """Fresh tokens for the demo's worker: who -> (token, scope)."""
    scopes = {
        "bob (member)": {"org": ORG, "role": "member", "user": "bob"},
        "ana (admin)": {"org": ORG, "role": "admin", "user": "ana"},
        "customer success (support)": {"org": ORG, "role": "support"},
    }
    return {who: (f"demo-{secrets.token_urlsafe(18)}", scope) for who, scope in scopes.items()}


def _wait_for_stop(worker: _Worker) -> None:
    """Until Ctrl-C (or SIGTERM), or until the worker exits by itself."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop and worker.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(keep: bool = False) -> None:
    started = time.monotonic()
    # Fresh topics take a moment to get leaders and metadata; aiokafka logs errors
    # meanwhile, which is noise in a report for people.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    run_id = f"demo-{int(time.time())}"
    with _stack() as (bootstrap, redis_url), tempfile.TemporaryDirectory() as tmp:
        from creditgate.devstack import find_free_port  # noqa: PLC0415

        registry = TopicRegistry.load(prefix=f"{run_id}.")
        env = {
            **os.environ,
            "CREDITGATE_KAFKA_BOOTSTRAP": bootstrap,
            "CREDITGATE_REDIS_URL": redis_url,
            "CREDITGATE_TOPIC_PREFIX": f"{run_id}.",
            "CREDITGATE_KEY_PREFIX": run_id,
            "CREDITGATE_APP_ID": run_id,
            "CREDITGATE_HTTP_PORT": str(find_free_port()),
        }
        tokens = demo_tokens()
        env["CREDITGATE_API_TOKENS"] = orjson.dumps(dict(tokens.values())).decode()
        console = f"http://127.0.0.1:{env['CREDITGATE_HTTP_PORT']}/console/"
        worker = _Worker(env, Path(tmp) / "worker.log")
        try:
            report = asyncio.run(_play(bootstrap, registry, worker))
            _print_notifications(report)
            print("\n▸ The console")
            print(f"    {console}")
            for who, (token, _) in tokens.items():
                print(f"    sign in as {who + ':':<29} {token}")
            if keep:
                print(
                    "\nthe stack and the worker stay up; press Ctrl-C (or send SIGTERM to "
                    f"process {os.getpid()}) to stop them",
                    flush=True,
                )
                _wait_for_stop(worker)
        except CreditgateError:
            log_file = Path(tmp) / "worker.log"
            if log_file.is_file():  # none when the stack failed before the worker started
                log = log_file.read_text(errors="replace")[-3000:]
                print(f"\nworker log (tail):\n{log}", file=sys.stderr)
            raise
        finally:
            worker.stop()
    kept = "" if keep else " (run `creditgate demo --keep` to look at the console)"
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; nothing left running{kept}")


def _print_notifications(report: _Report) -> None:
    print("\n▸ Notifications sent")
    for note in report.notifications:
        to = note["recipient"].get("user_id") or "admins"
        extra = {
            k: v
            for k, v in note.items()
            if k
            in (
                "threshold_percent",
                "credits_needed",
                "credits_left",
                "credits",
                "period_id",
                "expired_credits",
                "balance_after",
                "credit_limit",
                "limit_left",
                "credits_refunded",
            )
        }
        print(f"    {note['type']:<27} to {to:<7} {extra}")
