"""The web page at `/` in a real headless Chromium (Debian's, driven by Playwright) against real Serve."""

from __future__ import annotations

import json
import shutil

import pytest
from playwright.sync_api import Page, Route, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Headless on a machine with no network but loopback: without the background-networking
# switches Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def wait_until(page: Page, condition, attempts: int = 600) -> None:
    """Let Playwright deliver events (route handlers run then) until `condition()` holds."""
    for _ in range(attempts):
        if condition():
            return
        page.wait_for_timeout(100)
    raise AssertionError("condition never held")


@pytest.fixture(scope="module")
def browser():
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: `make install-test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_server) -> Page:
    context = browser.new_context(base_url=demo_server, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto("/")
    yield page
    context.close()


def test_generate_shows_images_with_seeds_and_errors_in_words(page: Page, tmp_path):
    expect(page.locator("#server-text")).to_contain_text("synthetic:tiny")  # /info was read
    expect(page.locator("#limits-hint")).to_contain_text("64–256")

    # Hold the request at the network layer so the in-progress state can be seen, then let it through.
    held: list[Route] = []
    page.route("**/generate", lambda route: held.append(route))
    page.fill("#prompt", "a lighthouse at dawn")
    page.fill("#seed", "42")
    page.fill("#num_images", "2")
    page.click("#connection summary")
    page.fill("#api_key", "secret-key")
    page.press("#api_key", "Tab")
    page.click("#generate")
    expect(page.locator("#generate")).to_have_attribute("aria-busy", "true")
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#generate")).to_contain_text("Generating")
    expect(page.locator(".card.pending")).to_have_count(2)
    wait_until(page, lambda: held)
    request = held[0].request
    assert request.headers["authorization"] == "Bearer secret-key"
    assert json.loads(request.post_data) == {
        "prompt": "a lighthouse at dawn",
        "seed": 42,
        "num_images": 2,
        "scheduler": "default",
        "output_format": "png",
        "response_format": "json",
    }
    held[0].continue_()
    page.unroute("**/generate")

    cards = page.locator("#gallery .card:not(.pending)")
    expect(cards).to_have_count(2)
    expect(page.locator("#generate")).to_be_enabled()
    expect(cards.nth(0).locator(".seed")).to_have_text("seed 42")
    expect(cards.nth(1).locator(".seed")).to_have_text("seed 43")
    expect(cards.nth(0)).to_contain_text("64×64")
    assert cards.nth(0).locator("img").evaluate("img => img.complete && img.naturalWidth") == 64
    download = cards.nth(0).locator("a.download")
    expect(download).to_have_attribute("download", "sd-42.png")
    assert download.get_attribute("href").startswith("blob:")

    # A validation error from the server, shown in its words, on the field it names.
    page.fill("#width", "512")
    page.click("#generate")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("width: must be between 64 and 256 (got 512)")
    expect(error).to_contain_text("422 invalid_request")
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(cards).to_have_count(2)  # the failed request left the gallery as it was
    page.screenshot(path=tmp_path / "web-page.png", full_page=True)
    assert (tmp_path / "web-page.png").stat().st_size > 10_000

    # Fixing the field clears the error; "Use seed" puts a card's seed back in the form.
    page.fill("#width", "")
    cards.nth(1).locator("button.reuse").click()
    expect(page.locator("#seed")).to_have_value("43")
    page.fill("#num_images", "1")
    page.click("#generate")
    expect(cards).to_have_count(3)
    expect(error).to_be_hidden()
    expect(cards.nth(0).locator(".seed")).to_have_text("seed 43")

    # The API key stays in this browser.
    page.reload()
    expect(page.locator("#api_key")).to_have_value("secret-key")


def test_a_busy_server_is_retried_as_retry_after_says(page: Page):
    calls = []

    def overloaded_once(route: Route):
        calls.append(route.request.url)
        if len(calls) == 1:
            body = {"error": {"code": "overloaded", "message": "queue full"}, "request_id": "r"}
            route.fulfill(status=503, headers={"Retry-After": "0"}, json=body)
        else:
            route.continue_()

    page.route("**/generate", overloaded_once)
    page.fill("#prompt", "a busy day")
    page.fill("#seed", "5")
    page.click("#generate")
    expect(page.locator("#gallery .card:not(.pending) .seed")).to_have_text("seed 5")
    expect(page.locator("#error")).to_be_hidden()
    assert len(calls) == 2
