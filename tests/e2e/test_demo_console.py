"""``creditgate demo --keep``: the demo's worker stays up with the demo's data, and the
console's address and tokens it prints let a person (here, a client) sign in."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

DEMO_SECONDS = 240


def start_demo(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "creditgate", "demo", "--keep"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_the_kept_demo_serves_its_console_until_stopped(endpoints: tuple[str, str]) -> None:
    bootstrap, redis_url = endpoints
    env = {**os.environ, "CREDITGATE_KAFKA_BOOTSTRAP": bootstrap, "CREDITGATE_REDIS_URL": redis_url}
    demo = start_demo(env)
    assert demo.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + DEMO_SECONDS
        while time.monotonic() < deadline:
            line = demo.stdout.readline()  # the demo prints as it goes
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "press Ctrl-C" in text, text[-3000:]
        address = re.search(r"(http://127\.0\.0\.1:\d+/console/)", text)
        admin = re.search(r"sign in as ana \(admin\):\s+(\S+)", text)
        member = re.search(r"sign in as bob \(member\):\s+(\S+)", text)
        assert address, text[-3000:]
        assert admin, text[-3000:]
        assert member, text[-3000:]
        base = address.group(1).removesuffix("/console/")
        async with aiohttp.ClientSession() as http:
            async with http.get(address.group(1)) as page:
                assert page.status == 200
                assert "Sign in" in await page.text()
            headers = {"Authorization": f"Bearer {admin.group(1)}"}
            async with http.get(f"{base}/v1/orgs/acme/members", headers=headers) as answer:
                team = await answer.json()
                assert answer.status == 200, team
            assert {m["user_id"] for m in team["members"]} >= {"ana", "bob", "cid"}
            headers = {"Authorization": f"Bearer {member.group(1)}"}
            path = f"{base}/v1/orgs/acme/users/bob/charges?action=export"
            async with http.get(path, headers=headers) as answer:
                assert answer.status == 200
                assert (await answer.json())["charges"]
        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=60)
        assert demo.returncode == 0, rest[-3000:]
        assert "nothing left running" in rest
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
