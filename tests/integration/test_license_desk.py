"""The license desk of the HTTP writes, on a real Kafka with no worker to answer: the
command is published all the same, and the caller gets its id to look it up later."""

from __future__ import annotations

import time

import pytest

from creditgate.api.errors import NoAnswerInTime
from creditgate.api.license_desk import LicenseDesk, NoAnswer, new_command_id
from creditgate.domain.commands import SetCreditsAllowed
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient
from creditgate.stream.topics import TopicRegistry, apply_topics


async def test_no_answer_in_time_names_the_published_command(
    settings: Settings, unique: str
) -> None:
    registry = TopicRegistry.load(prefix=f"desk{unique}.")
    await apply_topics(settings.kafka_bootstrap, registry)
    desk = LicenseDesk(settings, registry, timeout=1.5)
    command = SetCreditsAllowed(
        command_id=new_command_id(),
        org_id="acme",
        type="member.set_credits_allowed",
        user_id="u-17",
        allowed=False,
        set_by="ana",
    )
    async with CreditgateClient(
        settings.kafka_bootstrap, registry, (t.LICENSE_COMMANDS,)
    ) as watcher:
        started = time.monotonic()
        try:
            with pytest.raises(NoAnswer) as raised:
                await desk.submit(command)
        finally:
            await desk.close()
        assert 1.5 <= time.monotonic() - started < 10
        assert raised.value.command_id == command.command_id
        # it was published, and will be applied when a worker reads it
        published = await watcher.wait_for(
            t.LICENSE_COMMANDS, "command_id", command.command_id, timeout=10
        )
        assert published == command.model_dump(mode="json")

    body = NoAnswerInTime(raised.value.message, raised.value.command_id).body()
    assert (body["status"], body["code"], body["command_id"]) == (
        504,
        "no_answer",
        command.command_id,
    )
    assert command.command_id in str(body["detail"])
