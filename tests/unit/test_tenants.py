"""Tenants, their limits and the config that names them: the token bucket, daily quotas kept in the job store,
priorities, the 429s and their headers, key names, and the config check that keeps Serve's bounds above ours.
Through the HTTP app over a fake Generator (no Ray), with a fake clock where time matters."""

from __future__ import annotations

import asyncio

import pytest
from fake_generation import FakeGenerationService, demo_settings
from pydantic import ValidationError

from serve_app.config import AuthConfig, TenantsConfig, check_serve_config
from serve_app.job_queue.records import owner_of
from serve_app.job_queue.store import JobStore
from serve_app.service.errors import ApiError
from serve_app.service.tenants import DailyQuota, TenantAdmission, TenantDirectory, TokenBucket

# -- the token bucket -------------------------------------------------------------------------------


def test_a_bucket_holds_its_size_and_refills_at_its_rate():
    bucket = TokenBucket(per_minute=60, size=10, now=0)
    assert bucket.wait_s(10, 0) == 0
    bucket.take(10, 0)
    assert bucket.wait_s(1, 0) == pytest.approx(1.0)  # one image a second
    assert bucket.wait_s(3, 2.5) == pytest.approx(0.5)
    assert bucket.full_in_s(5) == pytest.approx(5.0)
    bucket.give_back(4, 5)
    assert bucket.level(5) == pytest.approx(9.0)


def test_a_request_bigger_than_the_bucket_goes_when_it_is_full_and_owes_the_rest():
    bucket = TokenBucket(per_minute=60, size=2, now=0)
    assert bucket.wait_s(4, 0) == 0
    bucket.take(4, 0)
    assert bucket.wait_s(1, 0) == pytest.approx(3.0)


# -- who is who ---------------------------------------------------------------------------------------


def test_keys_may_be_named_and_unnamed_ones_are_named_from_their_hash(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# keys\nalice sk-alice\nsk-plain\n")
    monkeypatch.setenv("SD_KEYS", "bob sk-bob, sk-env")
    keys = AuthConfig(api_keys_env="SD_KEYS", api_keys_file=str(keys_file)).load_named_keys()
    assert keys["alice"] == "sk-alice" and keys["bob"] == "sk-bob"
    unnamed = {name: key for name, key in keys.items() if name.startswith("key-")}
    assert sorted(unnamed.values()) == ["sk-env", "sk-plain"] and all(len(name) == 12 for name in unnamed)
    assert AuthConfig(api_keys_file=str(keys_file)).load_keys() == ["sk-alice", "sk-plain"]  # old callers: keys
    keys_file.write_text("alice one\nalice two\n")
    with pytest.raises(ValueError, match="two different keys are named 'alice'"):
        AuthConfig(api_keys_file=str(keys_file)).load_named_keys()


def test_a_tenant_is_its_keys_hash_its_x_tenant_name_or_everyone():
    config = TenantsConfig.model_validate({"default": {"rate": 60}, "keys": {"alice": {"weight": 3, "rate": None}}})
    with_keys = TenantDirectory(config, {"alice": "sk-alice", "key-1234abcd": "sk-other"})
    alice = with_keys.of_key("sk-alice")
    assert alice.id == owner_of("sk-alice") and alice.name == "alice"
    assert alice.policy.weight == 3 and alice.policy.rate is None  # its entry over the default
    assert with_keys.of_key("sk-other").policy.rate == 60
    open_door = TenantDirectory(config)
    assert open_door.of_name(None).id == "shared" and open_door.of_name("alice").policy.weight == 3
    assert open_door.of_name("carol").id not in ("shared", open_door.of_name("alice").id)


def test_a_tenants_entry_must_name_a_key():
    config = TenantsConfig.model_validate({"keys": {"alcie": {"weight": 2}}})
    with pytest.raises(ValueError, match="no API key is named alcie; the keys are named alice"):
        TenantDirectory(config, {"alice": "sk"})
    with pytest.raises(ValidationError, match="not a key name"):
        TenantsConfig.model_validate({"keys": {"no spaces": {}}})
    with pytest.raises(ValidationError):
        TenantsConfig.model_validate({"default": {"weight": 0}})
    with pytest.raises(ValidationError):
        TenantsConfig.model_validate({"default": {"max_priority": "urgent"}})


# -- the config check: Serve's bounds above ours ----------------------------------------------------------


def demo_with(ingress_ongoing=2048, generator_queued=1024, **extra) -> dict:
    ingress = {"name": "Ingress", "max_ongoing_requests": ingress_ongoing, "max_queued_requests": 2048}
    generator = {"name": "ImageGenerator", "max_ongoing_requests": 1024, "max_queued_requests": generator_queued}
    ingress.update(extra.pop("ingress", {}))
    return {"applications": [{"name": "sd", "args": extra.pop("args", {}), "deployments": [ingress, generator]}]}


def test_serves_own_bounds_must_sit_above_the_projects_admission():
    assert check_serve_config(demo_with()) == []
    problems = "\n".join(check_serve_config(demo_with(ingress_ongoing=256, generator_queued=256)))
    assert "max_ongoing_requests (256) must be at least twice args.limits.max_concurrent_requests (192)" in problems
    assert "max_queued_requests (256) is below the images one caller may have in flight" in problems
    assert "set it to at least 768" in problems
    fewer = demo_with(generator_queued=64, args={"limits": {"max_concurrent_requests": 16, "max_num_images": 2}})
    fewer["applications"][0]["args"]["jobs"] = {"max_running": 32}
    assert check_serve_config(fewer) == []


def test_serves_own_refusals_must_say_when_to_retry():
    config = demo_with(ingress={"backpressure_config": {"status_code": 503}})
    assert "Ingress.backpressure_config: set retry_after_s" in "\n".join(check_serve_config(config))
    config = demo_with(ingress={"backpressure_config": {"status_code": 503, "retry_after_s": 1}})
    assert check_serve_config(config) == []


# -- the daily quota, in the job store ------------------------------------------------------------------


def test_a_quota_count_survives_a_restart_and_adds_up_across_replicas(tmp_path):
    store = JobStore(str(tmp_path))
    clock = lambda: 86400 * 1000 + 3600.0  # noqa: E731 - a fixed time, one hour into a UTC day

    async def scenario():
        first = DailyQuota(store, "replica-a", clock)
        await first.ready()
        first.charge("t1", 3)
        assert not first.is_stored("t1")
        await first.flush()
        assert first.is_stored("t1")
        other = DailyQuota(store, "replica-b", clock)
        await other.ready()
        other.charge("t1", 2)
        await other.flush()
        restarted = DailyQuota(store, "replica-c", clock)  # replica-a died; its count stays in the store
        await restarted.ready()
        assert restarted.used("t1") == 5 and restarted.used("t2") == 0
        await first.flush()
        assert first.used("t1") == 5  # its own 3 and replica-b's 2
        for quota in (first, other, restarted):
            if quota._flusher is not None:
                quota._flusher.cancel()

    asyncio.run(scenario())


# -- through the HTTP app -------------------------------------------------------------------------------


def limited(make_client, tmp_path=None, **tenants):
    settings = demo_settings()
    settings = settings.model_copy(update={"tenants": TenantsConfig.model_validate(tenants)})
    return make_client(FakeGenerationService(settings))


def test_past_the_rate_a_tenant_gets_429_with_retry_after_and_ratelimit_headers(make_client):
    client = limited(make_client, default={"rate": 2, "burst": 2})
    first = client.post("/generate", json={"prompt": "a"}, headers={"X-Tenant": "alice"})
    assert first.status_code == 200
    assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("2", "1")
    assert client.post("/generate", json={"prompt": "b"}, headers={"X-Tenant": "alice"}).status_code == 200
    refused = client.post("/generate", json={"prompt": "c"}, headers={"X-Tenant": "alice"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["ratelimit-remaining"] == "0"
    assert int(refused.headers["ratelimit-reset"]) > 0 and refused.headers["ratelimit-limit"] == "2"
    other = client.post("/generate", json={"prompt": "d"}, headers={"X-Tenant": "bob"})  # its own bucket
    assert other.status_code == 200


def test_a_request_asking_for_more_images_than_are_left_is_refused_whole(make_client):
    client = limited(make_client, default={"rate": 1, "burst": 3})
    assert client.post("/generate", json={"prompt": "a", "num_images": 2}).status_code == 200
    refused = client.post("/generate", json={"prompt": "b", "num_images": 2})
    assert refused.status_code == 429 and "2 asked for, 1 available now" in refused.json()["error"]["message"]
    assert client.post("/generate", json={"prompt": "c"}).status_code == 200


def test_a_failed_request_is_not_charged(make_client):
    client = limited(make_client, default={"rate": 1, "burst": 1})
    bad = client.post("/generate", json={"prompt": "a", "width": 4096})
    assert bad.status_code == 422
    assert client.post("/generate", json={"prompt": "b"}).status_code == 200  # the bucket was still full


def test_images_in_flight_per_tenant(make_client, generator):
    client = limited(make_client, default={"max_concurrent": 2})
    admission = client.app.state.tenants
    tenant = admission.directory.of_name("alice")
    held = asyncio.run(admission.begin(tenant, synchronous=True, makes_images=True))
    held.charge(2)  # two images of alice's in flight
    refused = client.post("/generate", json={"prompt": "x"}, headers={"X-Tenant": "alice"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_images"
    assert refused.headers["retry-after"] == "2"
    job = client.post("/jobs", json={"prompt": "x"}, headers={"X-Tenant": "alice"})
    assert job.status_code != 429  # jobs queue; they are not images in flight
    assert client.post("/generate", json={"prompt": "x"}, headers={"X-Tenant": "bob"}).status_code == 200
    held.finish(200)
    assert client.post("/generate", json={"prompt": "x"}, headers={"X-Tenant": "alice"}).status_code == 200


def test_past_the_daily_quota_429_quota_exceeded_until_midnight(make_client, tmp_path):
    client = limited(make_client, default={"quota": 2})
    assert client.post("/generate", json={"prompt": "a", "num_images": 2}).status_code == 200
    refused = client.post("/generate", json={"prompt": "b"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    assert refused.headers["ratelimit-limit"] == "2" and refused.headers["ratelimit-remaining"] == "0"
    usage = client.get("/usage").json()
    assert usage["quota"]["used"] == 2 and usage["quota"]["remaining"] == 0 and usage["refused"] == {"quota": 1}


def test_priority_above_the_tenants_max_is_403_naming_the_field(make_client):
    client = limited(make_client, default={"max_priority": "normal"}, keys={"vip": {"max_priority": "high"}})
    refused = client.post("/generate", json={"prompt": "a", "priority": "high"})
    assert refused.status_code == 403 and refused.json()["error"]["field"] == "priority"
    assert "max_priority 'normal'" in refused.json()["error"]["message"]
    job = client.post("/jobs", json={"prompt": "a", "priority": "high"})
    assert job.status_code == 403 and job.json()["error"]["field"] == "priority"
    prompts = client.post(
        "/generate/prompts", json={"requests": [{"prompt": "a"}, {"prompt": "b", "priority": "high"}]}
    )
    assert prompts.status_code == 403 and prompts.json()["error"]["field"] == "requests.1.priority"
    assert client.post("/generate", json={"prompt": "a", "priority": "low"}).status_code == 200
    vip = client.post("/generate", json={"prompt": "a", "priority": "high"}, headers={"X-Tenant": "vip"})
    assert vip.status_code == 200
    assert client.post("/generate", json={"prompt": "a", "priority": "urgent"}).status_code == 422


def test_tasks_carry_the_tenant_its_weight_and_the_priority(make_client, tmp_path):
    client = limited(make_client, keys={"heavy": {"weight": 0.5}})
    service = client.app.state.service
    client.post("/generate", json={"prompt": "a"}, headers={"X-Tenant": "heavy"})
    client.post("/generate", json={"prompt": "b", "priority": "low"})
    heavy, anyone = service.generator.jobs
    assert heavy.tenant == client.app.state.tenants.directory.of_name("heavy").id and heavy.weight == 0.5
    assert heavy.priority == "normal" and anyone.tenant == "shared" and anyone.priority == "low"


def test_a_bad_x_tenant_is_422_naming_the_header(client):
    response = client.post("/generate", json={"prompt": "a"}, headers={"X-Tenant": "not a name"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "X-Tenant"


def test_with_keys_on_x_tenant_is_ignored_and_the_key_decides(make_client):
    settings = demo_settings().model_copy(
        update={"tenants": TenantsConfig.model_validate({"keys": {"alice": {"weight": 2}}})}
    )
    client = make_client(FakeGenerationService(settings), api_keys=["alice sk-a", "sk-b"])
    auth = {"Authorization": "Bearer sk-a", "X-Tenant": "someone-else"}
    usage = client.get("/usage", headers=auth).json()
    assert usage["tenant"] == owner_of("sk-a") and usage["name"] == "alice" and usage["policy"]["weight"] == 2
    assert client.get("/usage", headers={"Authorization": "Bearer sk-b"}).json()["name"].startswith("key-")


def test_usage_and_info_count_per_tenant_by_hashed_id(make_client):
    client = limited(make_client, default={"rate": 60})
    for _ in range(2):
        client.post("/generate", json={"prompt": "a"}, headers={"X-Tenant": "alice"})
    alice = client.app.state.tenants.directory.of_name("alice").id
    usage = client.get("/usage", headers={"X-Tenant": "alice"}).json()
    assert usage["tenant"] == alice and usage["name"] == "alice" and usage["images"] == 2
    assert usage["rate"]["limit"] == 60 and usage["rate"]["remaining"] == 58
    info = client.get("/info").json()["tenants"]
    assert info[alice]["images"] == 2 and "alice" not in str(info)


def test_limits_never_touch_probes(make_client):
    client = limited(make_client, default={"rate": 1, "burst": 1, "quota": 1})
    client.post("/generate", json={"prompt": "a"})
    for _ in range(3):
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_refusals_happen_before_the_body_is_read():
    directory = TenantDirectory(TenantsConfig.model_validate({"default": {"rate": 1, "burst": 1}}))
    admission = TenantAdmission(directory, clock=lambda: 0.0)
    tenant = directory.shared
    first = asyncio.run(admission.begin(tenant, synchronous=True, makes_images=True))
    first.charge(1)
    with pytest.raises(ApiError) as refused:
        asyncio.run(admission.begin(tenant, synchronous=True, makes_images=True))
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "60"


def test_every_429_and_503_says_when_to_retry():
    """Whatever layer refused, the answer carries Retry-After: the outermost layer adds it where none did."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve_app.api.middleware import RequestIdMiddleware

    def bare(request):
        return Response(status_code=int(request.query_params["status"]))

    def told(request):
        return Response(status_code=503, headers={"Retry-After": "7"})

    app = RequestIdMiddleware(Starlette(routes=[Route("/bare", bare), Route("/told", told)]), retry_after_s=3)
    with TestClient(app) as client:
        assert client.get("/bare?status=503").headers["retry-after"] == "3"
        assert client.get("/bare?status=429").headers["retry-after"] == "3"
        assert client.get("/told").headers.get_list("retry-after") == ["7"]
        assert "retry-after" not in client.get("/bare?status=500").headers


def test_serves_own_refusals_carry_the_configured_retry_after():
    from serve_app.app import build_app

    ingress = build_app({"model": "synthetic:tiny", "limits": {"retry_after_s": 5}})._bound_deployment
    generator, manager = (app._bound_deployment for app in ingress.init_args[:2])
    for bound in (ingress, generator, manager):
        assert bound._deployment_config.backpressure_config.retry_after_s == 5
