"""Probes, /info and the web page, over a fake Generator (no Ray). What a real replica reports in
/info (device, batching, counters) is checked in tests/e2e."""

from __future__ import annotations

import time

import pytest


def test_healthz_is_live_without_asking_the_generator(client, generator):
    generator.fail_with = RuntimeError("the generator is down")
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_ready_while_a_generator_replica_runs(client, service):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "generator": service.status}


@pytest.mark.parametrize(
    ("status", "ready"),
    [
        ({"status": "UPDATING", "running_replicas": 0, "replica_states": {"STARTING": 1}}, False),
        ({"status": "MISSING", "running_replicas": 0, "replica_states": {}}, False),
        ({"status": "UPDATING", "running_replicas": 1, "replica_states": {"RUNNING": 1, "STARTING": 1}}, True),
        ({"status": "HEALTHY", "running_replicas": 0, "replica_states": {}}, True),  # scaled to zero
    ],
)
def test_readyz_follows_the_generator_deployment(client, service, status, ready):
    service.status = status
    response = client.get("/readyz")
    assert response.json()["generator"] == status
    if ready:
        assert response.status_code == 200 and response.json()["status"] == "ready"
    else:
        assert response.status_code == 503 and response.json()["status"] == "not_ready"
        assert response.headers["retry-after"] == str(service.published_limits.retry_after_s)


def test_info_reports_settings_replicas_the_generators_own_account_and_outcomes(client, service):
    service.started_at = int(time.time()) - 100
    assert client.post("/generate", json={"prompt": "x"}).status_code == 200
    assert client.post("/generate", json={"prompt": "x", "width": 7}).status_code == 422
    info = client.get("/info").json()
    assert info["model"] == "synthetic:tiny" and info["auth"] is False
    assert info["limits"] == service.published_limits.model_dump() and info["limits"]["max_width"] == 256
    assert 100 <= info["uptime_s"] <= 102
    assert info["generator_deployment"] == service.status
    assert info["generator"] == {"replica": "fake-replica", "images": {"received": 1, "cancelled": 0}}
    assert info["responses_by_status"] == {"200": 1, "422": 1}  # this /info answer is not counted yet
    assert client.get("/info").json()["responses_by_status"] == {"200": 2, "422": 1}


def test_the_web_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/web/app.js", "/web/style.css"):
        assert path in page.text
        assert client.get(path).status_code == 200, path
    assert client.get("/web/missing.js").status_code == 404
