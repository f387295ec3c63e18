"""Shared set-up of the browser tests: Debian's Chromium driven by Playwright, no network."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch_chromium():
    """(playwright, browser): stop both with `close_chromium`."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium (make browser) for the browser tests"
    p = sync_playwright().start()
    return p, p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def close_chromium(p, browser) -> None:
    browser.close()
    p.stop()
