"""One Ray + Serve instance for the whole session; each module deploys the config it needs."""

from __future__ import annotations

import httpx
import pytest
from harness import ServeCluster, load_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def serve_cluster():
    cluster = ServeCluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def demo_server(serve_cluster) -> str:
    """The offline demo config (configs/cpu-demo.yaml) running; returns the base URL."""
    serve_cluster.deploy(load_config())
    return serve_cluster.url


@pytest.fixture
def client(demo_server):
    with httpx.Client(base_url=demo_server, timeout=60) as http:
        yield http
