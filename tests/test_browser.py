"""A person's checkout in a real browser: Debian's Chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from devkit.mailsink import SmtpSink
from tests.conftest import IN_CI, db_fetch, wait_for
from tests.pipeline import fulfillment_rows
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(90)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture
async def browser() -> Any:
    if not shutil.which(CHROMIUM):
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        await browser.close()


async def test_a_customer_clicks_checkout_pays_and_sees_the_order_fulfilled_once(
    browser: Any,
    checkout_stack: dict[str, Any],
    smtp: SmtpSink,
    worker_settings: WorkerSettings,
    start_worker: Any,
    database_url: str,
) -> None:
    await start_worker(worker_settings)
    page = await browser.new_page()

    await page.goto(checkout_stack["base"] + "/")
    await page.click("#checkout")
    await page.wait_for_url("**/pay/cs_*")
    assert "saved card" in await page.content()
    session_id = page.url.rsplit("/", 1)[1]
    await page.click("#pay")
    await page.wait_for_url("**/checkout/success?session_id=*")
    status = page.locator("#status")
    assert await status.get_attribute("data-payment-status") == "paid"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "checkout-success.png"), full_page=True)

    await wait_for(lambda: fulfillment_rows(database_url, session_id))
    await asyncio.to_thread(smtp.wait, 1)

    async def both_asked() -> bool:
        rows = await db_fetch(
            database_url,
            "SELECT 1 FROM processed_events WHERE checkout_session_id = $1",
            session_id,
        )
        return len(rows) == 2

    await wait_for(both_asked)
    assert len(await fulfillment_rows(database_url, session_id)) == 1
    [mail] = smtp.for_session(session_id)
    assert mail["To"] == "grace@example.com"
    assert "2 x Notebook" in mail.get_content()
