"""The console in a real browser: Debian's chromium, headless, driven by Playwright,
against a running worker (``scoped_api``: scoped tokens, state made through Kafka).

Playwright never downloads a browser here: it drives ``chromium`` from the system
packages (scripts/install-system-deps installs it). With
``CREDITGATE_CONSOLE_SCREENSHOTS=<folder>`` the tests also save the screens they reach,
at desktop and phone width (how docs/console/ was made).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from creditgate.domain.ids import rfc3339

from .conftest import ScopedApi

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 375, "height": 812}
# a screen updates within its polling interval (the page's ?poll=, in ms)
POLL_MS = 500
WAIT_MS = 15_000


def chromium_path() -> str:
    found = os.environ.get("CREDITGATE_CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail("no chromium: install it with scripts/install-system-deps (apt chromium)")
    return found


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def shot(page: Page, name: str) -> None:
    """Save the screen when screenshots are asked for, at desktop and phone width."""
    folder = os.environ.get("CREDITGATE_CONSOLE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, tiny
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        await page.set_viewport_size(size)
        await page.wait_for_timeout(300)  # the layout settles
        await page.screenshot(path=f"{folder}/{name}-{label}.png", full_page=True)
    await page.set_viewport_size(DESKTOP)


async def signed_in(browser: Browser, api: ScopedApi, kind: str, screen: str = "") -> Page:
    """A new tab on the console, signed in with a ``kind`` token from the keyboard."""
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    await page.goto(f"{api.base}/console/?poll={POLL_MS}{screen}")
    field = page.get_by_label("API token")
    await field.focus()
    await page.keyboard.type(api.tokens[kind])
    await page.keyboard.press("Enter")  # the form submits without a mouse
    await expect(page.locator("#app")).to_be_visible(timeout=WAIT_MS)
    return page


async def api_json(api: ScopedApi, kind: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{api.base}{path}", headers=api.auth(kind)) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_a_member_sees_their_balance_and_their_exports_with_their_credits(
    browser: Browser, scoped_api: ScopedApi
) -> None:
    page = await signed_in(browser, scoped_api, "member")
    _, credits = await api_json(scoped_api, "member", "/v1/orgs/acme/credits")
    await expect(page.locator("#credits-remaining")).to_have_text(
        f"{credits['remaining']:,}", timeout=WAIT_MS
    )
    await expect(page.locator("#credits-used")).to_have_text(f"{credits['used']:,}")
    await expect(page.locator("#who")).to_contain_text("u-17")
    await expect(page.get_by_role("heading", name="My exports")).to_be_visible()

    rows = page.locator("#history-table tbody tr")
    await expect(rows).to_have_count(2, timeout=WAIT_MS)
    first = page.locator('tr[data-request-id="exp-0001"]')
    second = page.locator('tr[data-request-id="exp-0002"]')
    await expect(first.locator('td[data-label="Credits charged"]')).to_have_text("2")
    await expect(first.locator('td[data-label="Items"]')).to_have_text("2")
    await expect(first.locator('td[data-label="Reference"]')).to_contain_text("e-1")
    await expect(second.locator('td[data-label="Credits charged"]')).to_have_text("1")
    await expect(second.locator('td[data-label="Free repeats"]')).to_contain_text("1 free")
    await expect(second.locator('td[data-label="Free repeats"]')).to_contain_text("until")
    # a member has no team tab
    await expect(page.locator("#tab-team")).to_be_hidden()
    await shot(page, "credits-and-exports")

    await page.get_by_role("link", name="My CRM pushes").click()
    await expect(page.get_by_role("heading", name="My CRM pushes")).to_be_visible()
    push = page.locator('tr[data-request-id="push-0001"]')
    await expect(push.locator('td[data-label="Reference"]')).to_contain_text("hubspot")
    await expect(push.locator('td[data-label="Credits charged"]')).to_have_text("1")
    await shot(page, "crm-pushes")
    await page.context.close()


async def test_holds_show_what_became_of_them_and_refunds_show_beside_the_credits(
    browser: Browser, scoped_api: ScopedApi
) -> None:
    """beta's u-17 (no other test looks at beta's exports): a hold settled, one open, an
    export refunded in part, seen by beta's admin."""
    client, now = scoped_api.client, time.time()

    def export(request_id: str, contacts: list[str], **fields: Any) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "org_id": "beta",
            "user_id": "u-17",
            "action": "export",
            "items": [{"type": "contact", "id": c} for c in contacts],
            "requested_at": rfc3339(int(now * 1000)),
            **fields,
        }

    held = await client.request(export("hold-settled", ["c-50", "c-51", "c-52"], hold={}))
    assert held["type"] == "charge.held", held
    settled = await client.settlement(
        {
            "settlement_id": "stl-console-1",
            "org_id": "beta",
            "request_id": "hold-settled",
            "type": "hold.settle",
            "items": [{"type": "contact", "id": "c-50"}],
        }
    )
    assert settled["type"] == "hold.settled", settled
    still = await client.request(export("hold-open", ["c-60"], hold={"expires_in_seconds": 3600}))
    assert still["type"] == "charge.held", still
    charged = await client.request(export("exp-refunded", ["c-70", "c-71"]))
    assert charged["credits_charged"] == 2, charged
    refund = await client.command(
        {
            "command_id": "refund-console-1",
            "org_id": "beta",
            "type": "charge.refund",
            "request_id": "exp-refunded",
            "items": [{"type": "contact", "id": "c-70"}],
            "reason": "the CRM refused the push",
            "refunded_by": "cs-1",
        }
    )
    assert refund["type"] == "command.applied", refund

    page = await signed_in(browser, scoped_api, "admin_other_org", "#exports:u-17")
    rows = page.locator("#history-table tbody tr")
    await expect(rows).to_have_count(3, timeout=WAIT_MS)
    done = page.locator('tr[data-request-id="hold-settled"]')
    await expect(done.locator('td[data-label="Result"]')).to_contain_text("Settled")
    await expect(done.locator('td[data-label="Result"]')).to_contain_text("2 released")
    await expect(done.locator('td[data-label="Credits charged"]')).to_have_text("1")
    waiting = page.locator('tr[data-request-id="hold-open"]')
    await expect(waiting.locator('td[data-label="Result"]')).to_contain_text("Held")
    await expect(waiting.locator('td[data-label="Result"]')).to_contain_text("1 held until")
    refunded = page.locator('tr[data-request-id="exp-refunded"]')
    await expect(refunded.locator('td[data-label="Credits charged"]')).to_contain_text("2")
    await expect(refunded.locator('td[data-label="Credits charged"]')).to_contain_text("1 refunded")
    await expect(refunded.locator('td[data-label="Result"]')).to_have_text("Approved")
    await expect(page.locator("#credits-held")).to_have_text("1")
    await shot(page, "holds-and-refunds")
    await page.context.close()


async def test_an_admin_disallows_a_member_whose_next_export_is_rejected(
    browser: Browser, scoped_api: ScopedApi
) -> None:
    page = await signed_in(browser, scoped_api, "admin", "#team")
    await expect(page.get_by_role("heading", name="My team")).to_be_visible()
    row = page.locator('#team-table tr[data-user="u-21"]')
    await expect(row.locator('td[data-label="Credits use"]')).to_have_text(
        "Allowed", timeout=WAIT_MS
    )
    exports_of_u17 = page.locator('#team-table tr[data-user="u-17"] td[data-label="Exports"]')
    await expect(exports_of_u17).to_have_text("3")
    await expect(row.locator('td[data-label="Limit"]')).to_have_text("none")  # none set

    button = row.get_by_role("button", name="Disallow credits use: u-21")
    await button.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#team-status")).to_contain_text("u-21", timeout=WAIT_MS)
    await expect(row.locator('td[data-label="Credits use"]')).to_have_text("Disallowed")
    await expect(row.get_by_role("button", name="Allow: u-21")).to_be_visible()

    # the worker applied it: u-21's next export is rejected, as seen on Kafka
    result = await scoped_api.client.request(
        {
            "request_id": f"exp-u21-{time.time_ns()}",
            "org_id": "acme",
            "user_id": "u-21",
            "action": "export",
            "items": [{"type": "contact", "id": "c-77"}],
            "requested_at": rfc3339(int(time.time() * 1000)),
        }
    )
    assert (result["type"], result["reason"]) == ("charge.rejected", "credits_disallowed")
    assert result["credits_charged"] == 0

    # and the team page, read anew, still shows them disallowed
    await page.reload()
    await expect(row.locator('td[data-label="Credits use"]')).to_have_text(
        "Disallowed", timeout=WAIT_MS
    )
    status, team = await api_json(scoped_api, "admin", "/v1/orgs/acme/members")
    assert status == 200
    assert {m["user_id"]: m["credits_allowed"] for m in team["members"]}["u-21"] is False
    await shot(page, "team")
    await page.context.close()


async def test_a_members_token_cannot_open_the_team_page(
    browser: Browser, scoped_api: ScopedApi
) -> None:
    page = await signed_in(browser, scoped_api, "member", "#team")
    await expect(page.locator("#tab-team")).to_be_hidden()
    await expect(page.locator("#team-error")).to_contain_text("may not", timeout=WAIT_MS)
    await expect(page.locator("#team-table tbody tr")).to_have_count(0)
    status, problem = await api_json(scoped_api, "member", "/v1/orgs/acme/members")
    assert (status, problem["code"]) == (403, "forbidden")
    await page.context.close()


async def test_the_console_is_served_whole_by_the_worker(
    browser: Browser, scoped_api: ScopedApi
) -> None:
    """Nothing is fetched from another origin, and nothing the page loads fails."""
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    requested: list[str] = []
    failed: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("console", lambda m: failed.append(m.text) if m.type == "error" else None)
    await page.goto(f"{scoped_api.base}/console/")
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert requested
    assert all(url.startswith(scoped_api.base) for url in requested), requested
    assert failed == []
    # at phone width nothing is wider than the screen
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"]
    await context.close()
