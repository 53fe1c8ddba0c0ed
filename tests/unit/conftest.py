"""Fixtures for route tests: the FastAPI app over a fake Generator, driven in-process (no Ray)."""

from __future__ import annotations

import pytest
from fake_generation import FakeGenerationService, FakeGenerator
from starlette.testclient import TestClient

from serve_app.api.asgi import create_api


@pytest.fixture
def service() -> FakeGenerationService:
    """The demo config's settings (configs/cpu-demo.yaml) over a FakeGenerator."""
    return FakeGenerationService()


@pytest.fixture
def generator(service) -> FakeGenerator:
    return service.generator


@pytest.fixture
def make_client():
    """make_client(service, api_keys=None): a TestClient for create_api(service, api_keys), closed after the test."""
    clients = []

    def make(service: FakeGenerationService, api_keys: list[str] | None = None) -> TestClient:
        client = TestClient(create_api(service, api_keys), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(service, make_client) -> TestClient:
    return make_client(service)
