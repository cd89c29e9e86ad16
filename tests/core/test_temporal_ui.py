"""The Temporal UI of `make run`, in a real browser: payloads are encrypted, and the UI shows
them decoded through the dev stack's codec server. The screenshot is kept for a human."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from devstack.settings import ROOT
from tests.cli.test_dev_stack import referrals, stack_on_free_ports, start_stack, stop_stack
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS


async def test_the_ui_shows_a_referral_decoded_through_the_codec_server(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    config, ports, env = stack_on_free_ports(tmp_path)
    process = start_stack(config, env, tmp_path / "stack.log")
    try:
        client_env = {**env, "TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}"}
        example = ROOT / "examples" / "referral.json"
        referral_id = referrals(client_env, tmp_path, "submit", str(example)).strip()
        url = f"http://127.0.0.1:{ports['ui']}/namespaces/default/workflows/{referral_id}"
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
            )
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 1600})
                await page.goto(url)
                # Only a decoded payload shows the referrer's address.
                decoded = page.get_by_text("claire.martin@conseil-martin.example").first
                await expect(decoded).to_be_visible(timeout=45_000)
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                await page.screenshot(
                    path=str(SCREENSHOTS / "temporal-ui-decoded.png"), full_page=True
                )
            finally:
                await browser.close()
    finally:
        stop_stack(process)
