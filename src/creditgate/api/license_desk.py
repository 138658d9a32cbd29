"""Team and admin actions over HTTP, written the one way license state is written: as a
license command on ``credits.license.commands``, answered by the worker's license event.

The HTTP handler never writes Redis: the decision loop applies the command (with its
checks, its ledger entry and its notifications) as it applies a command of the CLI, and
the desk waits for the event carrying the command's id. Publishing and waiting are the
CLI's (``stream.client.CreditgateClient.command``); the desk keeps one client for the
worker's life, started on the first write, and forgets every event nobody waits for, so
a long-running worker holds no more than the answers in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from creditgate.domain.commands import LicenseCommand
from creditgate.errors import CreditgateError
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient, Timeout
from creditgate.stream.topics import TopicRegistry


class NoAnswer(CreditgateError):
    """The command was published but its event did not come in time; the worker will
    still apply it, and its event will carry ``command_id``."""

    def __init__(self, command_id: str, seconds: float) -> None:
        self.command_id = command_id
        super().__init__(
            f"command {command_id} was published, but no license event answered it within "
            f"{seconds:g}s; it will still be applied: look for its event by command_id"
        )


def new_command_id() -> str:
    return f"http-{uuid.uuid4().hex[:16]}"


class LicenseDesk:
    """Publishes license commands and waits for their events."""

    def __init__(self, settings: Settings, registry: TopicRegistry, timeout: float) -> None:
        self._settings = settings
        self._registry = registry
        self.timeout = timeout
        self._client: CreditgateClient | None = None
        self._starting = asyncio.Lock()
        self._waiting: set[str] = set()

    async def _started(self) -> CreditgateClient:
        async with self._starting:
            if self._client is None:
                client = CreditgateClient(
                    self._settings.kafka_bootstrap,
                    self._registry,
                    (t.LICENSE_EVENTS,),
                    settings=self._settings,
                )
                await client.start()
                self._client = client
            return self._client

    async def submit(self, command: LicenseCommand) -> dict[str, Any]:
        """The license event of ``command`` (applied or rejected); raises ``NoAnswer``."""
        client = await self._started()
        body = command.model_dump(mode="json")
        command_id = body["command_id"]
        self._waiting.add(command_id)
        try:
            return await client.command(body, timeout=self.timeout)
        except Timeout:
            raise NoAnswer(command_id, self.timeout) from None
        finally:
            self._waiting.discard(command_id)
            seen = client.seen[t.LICENSE_EVENTS]
            seen[:] = [e for e in seen if e.get("command_id") in self._waiting]

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # stopping: nothing left to answer
                await self._client.stop()
            self._client = None
