"""The Temporal UI of `make run`, in a real browser: payloads are encrypted, and the UI shows
them decoded through the dev stack's codec server. The screenshot is kept for a human."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from playwright.async_api import async_playwright, expect

from tests.conftest import ROOT, free_port
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS
from tests.test_dev_stack import referrals, start_stack, stop_stack


async def test_the_ui_shows_a_referral_decoded_through_the_codec_server(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    ports = {name: free_port() for name in ("temporal", "ui", "smtp", "web", "codec")}
    stack = yaml.safe_load((ROOT / "temporal-dev.yaml").read_text())
    stack["temporal"].update(port=ports["temporal"], ui_port=ports["ui"])
    stack["mail_sink"]["port"] = ports["smtp"]
    stack["web"]["port"] = ports["web"]
    stack["codec_server"]["port"] = ports["codec"]
    config = tmp_path / "temporal-dev.yaml"
    config.write_text(yaml.safe_dump(stack))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "REFERRALS_"))},
        "REFERRALS_PROGRAM": str(ROOT / "program.yaml"),
    }
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
