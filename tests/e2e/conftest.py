"""One Ray + Serve instance for the whole session; each module deploys the config it needs.

Every test here is marked `e2e` by tests/conftest.py (by its path). A module either runs against
the demo config (`demo_server` / `client`) or against variants of it (`deployed_variant`), never
both, so that no test depends on which config an earlier test left running.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import httpx
import pytest
from harness import ServeCluster, load_config, with_tenants

_running: list[ServeCluster] = []  # the session's cluster while it runs


@pytest.fixture(scope="session")
def serve_cluster():
    cluster = ServeCluster.start()
    _running.append(cluster)
    yield cluster
    if _running:
        _running.pop().stop()


@pytest.fixture(scope="module", autouse=True)
def _own_ray_runs_alone(request):
    """A module marked `own_ray` starts a Ray instance of its own: the session's is stopped first (such tests
    run last, tests/conftest.py), so the two never share the machine's two cores."""
    if request.node.get_closest_marker("own_ray") and _running:
        _running.pop().stop()


def _still_running(cluster: ServeCluster) -> ServeCluster:
    if cluster not in _running:
        raise RuntimeError("the session's Ray was stopped for an own_ray module: those run last (tests/conftest.py)")
    return cluster


@pytest.fixture(scope="module")
def demo_server(serve_cluster) -> str:
    """The offline demo config (configs/cpu-demo.yaml) running; returns the base URL."""
    _still_running(serve_cluster).deploy(load_config())
    return serve_cluster.url


@pytest.fixture
def client(demo_server):
    with httpx.Client(base_url=demo_server, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def deployed_variant(serve_cluster) -> Callable[[Callable[[dict], None]], str]:
    """deployed_variant(edit): deploy the demo config as `edit(config)` changes it (in place) and return
    the base URL once it runs. The variant stays after the module: the next module deploys what it needs
    (`demo_server` deploys the demo config; deploying the config that already runs costs nothing).

        def tight(config):
            deployment(config, "ImageGenerator")["max_ongoing_requests"] = 4

        url = deployed_variant(tight)
    """

    def deploy(edit: Callable[[dict], None]) -> str:
        config = load_config()
        edit(config)
        _still_running(serve_cluster).deploy(config)
        return serve_cluster.url

    return deploy


@pytest.fixture(scope="session")
def tenants_folder(tmp_path_factory):
    """Where harness.with_tenants keeps its keys file and job store: one folder for the session, so that the
    modules deploying that variant deploy the same config (the second deploy costs nothing)."""
    return tmp_path_factory.mktemp("tenants")


@pytest.fixture(scope="module")
def tenants_server(deployed_variant, tenants_folder) -> str:
    """The demo with API keys, tenant policies and CORS (harness.with_tenants) running; returns the base URL."""
    return deployed_variant(lambda config: with_tenants(config, tenants_folder))


# -- a real browser (Debian's Chromium, driven by Playwright) for the web page's tests ----------------

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


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    # Expectations wait on the page's state up to a deadline; Playwright's 5 s is short for a job on a
    # machine that other suites load.
    expect.set_options(timeout=60_000)
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: `make install-test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(base_url, path="/"): a page in a browser context of its own (its own storage, as another
    visitor's), at `path` (None: not yet loaded); actions wait up to 60 s. Contexts close after the test."""
    contexts = []

    def open_(base_url: str, path: str | None = "/"):
        context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 800})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        if path is not None:
            page.goto(path)
        if path == "/":  # the web page: its first loads show sections that move the form (app.js)
            from playwright.sync_api import expect

            expect(page.locator("html[data-loaded=true]")).to_be_attached()
        return page

    yield open_
    for context in contexts:
        context.close()
