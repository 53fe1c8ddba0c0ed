"""The web page at `/` in a real headless Chromium (Debian's, driven by Playwright) against real Serve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from harness import DEMO_LONGEST, counted_since, generator_jobs, quiet, wait_until
from helpers import decode, pixels
from playwright.sync_api import Page, Route, expect


def page_until(page: Page, condition, what: str, timeout_s: float = 60) -> None:
    """Let Playwright deliver events (route handlers run then) until `condition()` holds."""
    for _ in range(int(timeout_s * 10)):
        if condition():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")


def answer_the_first(page: Page, pattern: str, method: str, **answer) -> list[str]:
    """The first `method` request to `pattern` gets `answer` (Route.fulfill's arguments), later ones go to
    the server; returns the URLs of those requests, as they come."""
    urls: list[str] = []

    def route(route: Route):
        if route.request.method != method:
            return route.continue_()
        urls.append(route.request.url)
        return route.fulfill(**answer) if len(urls) == 1 else route.continue_()

    page.route(pattern, route)
    return urls


@pytest.fixture
def page(open_page, demo_server) -> Page:
    return open_page(demo_server)


def test_generate_runs_a_job_shows_its_images_with_seeds_and_errors_in_words(
    page: Page, open_page, demo_server, tmp_path
):
    expect(page.locator("#server-text")).to_contain_text("synthetic:tiny")  # /info was read
    expect(page.locator("#limits-hint")).to_contain_text("64–256")

    # Hold the submission at the network layer to see what the page sends, then let it through.
    held: list[Route] = []
    page.route("**/jobs", lambda route: held.append(route) if route.request.method == "POST" else route.continue_())
    page.fill("#prompt", "a lighthouse at dawn")
    page.fill("#seed", "42")
    page.fill("#num_images", "2")
    page.click("#connection summary")
    page.fill("#api_key", "secret-key")
    page.press("#api_key", "Tab")
    page.click("#generate")
    expect(page.locator("#generate")).to_have_attribute("aria-busy", "true")
    page_until(page, lambda: held, "the page sends the job")
    request = held[0].request
    assert request.headers["authorization"] == "Bearer secret-key"
    assert json.loads(request.post_data) == {
        "prompt": "a lighthouse at dawn",
        "seed": 42,
        "num_images": 2,
        "scheduler": "default",
        "model": "synthetic:tiny",  # the demo serves two models: the chosen one (the default) is named
    }
    held[0].continue_()
    page.unroute("**/jobs")

    job = page.locator("#gallery .job").first
    expect(job.locator(".card:not(.pending)")).to_have_count(2)
    cards = page.locator(f"#gallery .job[data-job='{job.get_attribute('data-job')}'] .card:not(.pending)")
    expect(job.locator(".job-state")).to_contain_text("done")
    expect(job.locator(".cancel")).to_be_hidden()
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
    expect(error).to_contain_text("width: must be a multiple of 8 from 64 to 256 (got 512)")
    expect(error).to_contain_text("422 invalid_request")
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#gallery .job")).to_have_count(1)  # the refused request added nothing
    page.screenshot(path=tmp_path / "web-page.png", full_page=True)
    assert (tmp_path / "web-page.png").stat().st_size > 10_000

    # Fixing the field clears the error; "Use seed" puts a card's seed back in the form.
    page.fill("#width", "")
    cards.nth(1).locator("button.reuse").click()
    expect(page.locator("#seed")).to_have_value("43")
    page.fill("#num_images", "1")
    page.click("#generate")
    expect(page.locator("#gallery .job")).to_have_count(2)
    expect(error).to_be_hidden()
    expect(page.locator("#gallery .job").first.locator(".card:not(.pending) .seed")).to_have_text("seed 43")

    # Jobs outlive the page: after a reload they are listed again, with their images; the key stays.
    page.reload()
    expect(page.locator("#api_key")).to_have_value("secret-key")
    expect(cards).to_have_count(2)
    expect(page.locator("#gallery .job")).to_have_count(2)

    # The page lists the jobs this browser submitted, not everyone's: another visitor sees none of them.
    other = open_page(demo_server)
    expect(other.locator("#server-text")).to_contain_text("synthetic:tiny")
    expect(other.locator("#empty")).to_be_visible()
    expect(other.locator("#gallery .job")).to_have_count(0)


def test_lora_adapters_are_offered_applied_at_their_scale_and_shown_on_the_image(page: Page, client):
    # The demo serves two models (a field to choose, the default chosen and sent) and their adapters.
    expect(page.locator("#loras-field")).to_be_visible()
    expect(page.locator("#loras .lora .lora-name")).to_have_text(["flux-ink", "ink", "neon"])
    expect(page.locator("#model-field")).to_be_visible()
    expect(page.locator("#model")).to_have_value("synthetic:tiny")

    held: list[Route] = []
    page.route("**/jobs", lambda route: held.append(route) if route.request.method == "POST" else route.continue_())
    page.fill("#prompt", "a lighthouse")
    page.fill("#seed", "7")
    page.check("#loras .lora[data-lora='ink'] .lora-use")
    page.fill("#loras .lora[data-lora='ink'] .lora-scale", "0.8")
    page.click("#generate")
    page_until(page, lambda: held, "the page sends the job")
    body = json.loads(held[0].request.post_data)
    assert body["loras"] == [{"name": "ink", "scale": 0.8}] and body["model"] == "synthetic:tiny"
    held[0].continue_()
    page.unroute("**/jobs")

    card = page.locator("#gallery .job").first.locator(".card:not(.pending)")
    expect(card).to_contain_text("LoRA ink 0.8")
    job_id = page.locator("#gallery .job").first.get_attribute("data-job")
    # The stored image is the one the API makes for the same request.
    stored = client.get(f"/jobs/{job_id}/images/0").content
    made = client.post(
        "/generate", json={"prompt": "a lighthouse", "seed": 7, "loras": [{"name": "ink", "scale": 0.8}]}
    )
    assert np.array_equal(pixels(decode(stored)), pixels(decode(made.content)))


def test_a_running_job_shows_its_progress_and_preview_and_can_be_cancelled(page: Page, client):
    before = quiet(client)
    # The longest job the demo allows (4 images of DEMO_LONGEST, minutes of work): it outlasts the clicks below.
    page.fill("#prompt", "a long job")
    for field in ("num_inference_steps", "width", "height"):
        page.fill(f"#{field}", str(DEMO_LONGEST[field]))
    expect(page.locator(f"#scheduler option[value='{DEMO_LONGEST['scheduler']}']")).to_have_count(1)  # /info read
    page.select_option("#scheduler", DEMO_LONGEST["scheduler"])
    page.fill("#num_images", "4")
    page.check("#preview")
    page.click("#generate")
    job = page.locator("#gallery .job").first
    expect(job.locator(".job-state")).to_contain_text("step")
    expect(job.locator("progress")).to_be_visible()
    expect(job.locator(".job-preview")).to_be_visible()
    wait_until(lambda: generator_jobs(client)["running"] == 4, 60, "the job's four images are being denoised")
    job.locator(".cancel").click()
    expect(job.locator(".job-state")).to_have_text("canceled")
    expect(job.locator(".card")).to_have_count(0)
    # What cancelling guarantees: the four images left the engine at their next step, none finished.
    done = counted_since(before, quiet(client))
    assert (done["received"], done["cancelled_in_flight"], done["succeeded"]) == (4, 4, 0), done


def test_a_busy_server_is_retried_as_retry_after_says(page: Page):
    overloaded = {"error": {"code": "overloaded", "message": "queue full"}, "request_id": "r"}
    calls = answer_the_first(page, "**/jobs", "POST", status=503, headers={"Retry-After": "0"}, json=overloaded)
    page.fill("#prompt", "a busy day")
    page.fill("#seed", "5")
    page.click("#generate")
    expect(page.locator("#gallery .job").first.locator(".card:not(.pending) .seed")).to_have_text("seed 5")
    expect(page.locator("#error")).to_be_hidden()
    assert len(calls) == 2


def test_an_event_stream_that_ends_before_its_job_is_followed_again(page: Page):
    # As a proxy's idle time-out would end it: one event, then the end; and the job, read then, still runs
    # (as it would mid-job, whatever its real pace), so the page must open its stream again.
    one_event = 'event: running\ndata: {"id": "x"}\n\n'
    streams = answer_the_first(page, "**/jobs/*/events", "GET", content_type="text/event-stream", body=one_event)
    reads = answer_the_first(page, "**/jobs/*", "GET", json={"status": "running"})
    page.fill("#prompt", "a short stream")
    page.fill("#seed", "9")
    page.click("#generate")
    expect(page.locator("#gallery .job").first.locator(".card:not(.pending) .seed")).to_have_text("seed 9")
    expect(page.locator("#gallery .job").first.locator(".job-state")).to_contain_text("done")
    assert len(streams) == 2 and len(reads) == 1  # the cut stream, the read, the stream that saw it end


@pytest.mark.parametrize(("path", "shows"), [("/docs", ".swagger-ui .info .title"), ("/redoc", "h1")])
def test_the_api_documentation_renders_with_no_network(open_page, demo_server, path, shows):
    page = open_page(demo_server, path=None)
    outside: list[tuple[str, str]] = []
    # Anything but this server is refused (and recorded): the documentation must not need it.
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(demo_server)
            else (outside.append((route.request.resource_type, route.request.url)), route.abort())
        ),
    )
    page.goto(path)
    expect(page.locator(shows).first).to_contain_text("Stable Diffusion on Ray Serve")
    # No script, style sheet or font from elsewhere; at most ReDoc's "by Redocly" logo, which it links to.
    assert [url for kind, url in outside if kind != "image"] == []
