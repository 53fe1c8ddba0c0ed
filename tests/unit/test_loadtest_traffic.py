"""The request mix (loadtest/traffic.py) and the Locust load shapes (loadtest/shapes.py)."""

from collections import Counter

import pytest

from loadtest.shapes import PROFILES, stage_at, total_seconds
from loadtest.traffic import PROMPTS_FILE, RequestMix, RequestStream, load_prompts


def bodies(mix: RequestMix, n: int = 400, seed: int = 0):
    stream = RequestStream(mix, seed=seed)
    return [stream.next() for _ in range(n)]


def test_the_shipped_prompt_list_is_read_without_comments():
    prompts = load_prompts()
    assert len(prompts) >= 20
    assert not any(p.startswith("#") for p in prompts)
    assert PROMPTS_FILE.read_text().count("\n") > len(prompts)  # the header comment was skipped


def test_default_mix_leaves_size_and_steps_to_the_model():
    for request in bodies(RequestMix.from_specs(), 50):
        assert request.method == "POST" and request.path == "/generate" and request.endpoint == "png"
        assert "width" not in request.body and "num_inference_steps" not in request.body
        assert request.body["prompt"] in load_prompts() and 0 <= request.body["seed"] < 2**32


def test_weights_shape_the_mix():
    mix = RequestMix.from_specs(sizes="64x64:3,128x96:1", steps="2,4", endpoints="png:1,json:1")
    requests = bodies(mix)
    sizes = Counter((r.body["width"], r.body["height"]) for r in requests)
    assert set(sizes) == {(64, 64), (128, 96)}
    assert sizes[(64, 64)] > 2 * sizes[(128, 96)]
    assert {r.body["num_inference_steps"] for r in requests} == {2, 4}
    json_requests = [r for r in requests if r.endpoint == "json"]
    assert json_requests and all(r.body["response_format"] == "json" for r in json_requests)
    assert all(r.body["response_format"] == "image" for r in requests if r.endpoint == "png")


def test_each_endpoint_spells_the_same_parameters_its_own_way():
    mix = RequestMix.from_specs(sizes="96x64", steps="3", endpoints="openai:1,a1111:1", negative_share=1.0)
    requests = {r.endpoint: r for r in bodies(mix, 50)}
    openai, a1111 = requests["openai"], requests["a1111"]
    assert (openai.path, a1111.path) == ("/v1/images/generations", "/sdapi/v1/txt2img")
    assert openai.body["size"] == "96x64" and openai.body["n"] == 1 and openai.body["num_inference_steps"] == 3
    assert "width" not in openai.body and openai.body["negative_prompt"]
    assert (a1111.body["width"], a1111.body["height"], a1111.body["steps"]) == (96, 64, 3)
    assert "num_inference_steps" not in a1111.body


@pytest.mark.parametrize(("share", "expected"), [(0.0, 0), (1.0, 100)])
def test_negative_share_decides_who_gets_a_negative_prompt(share, expected):
    requests = bodies(RequestMix.from_specs(negative_share=share), 100)
    assert sum("negative_prompt" in r.body for r in requests) == expected


def test_the_same_seed_sends_the_same_requests():
    mix = RequestMix.from_specs(sizes="64x64,128x128", steps="2,3")
    assert [r.body for r in bodies(mix, 30, seed=5)] == [r.body for r in bodies(mix, 30, seed=5)]
    assert [r.body for r in bodies(mix, 30, seed=5)] != [r.body for r in bodies(mix, 30, seed=6)]


@pytest.mark.parametrize(
    ("specs", "says"),
    [
        ({"sizes": "64"}, "sizes: '64' is not WIDTHxHEIGHT"),
        ({"sizes": "64x64:zero"}, "sizes: weight 'zero'"),
        ({"steps": "two"}, "steps: 'two' is not a positive whole number"),
        ({"steps": "2:-1"}, "steps: weight of '2' must be positive"),
        ({"endpoints": "png,grpc"}, "endpoints: unknown grpc"),
        ({"negative_share": 2.0}, "negative_share must be between 0 and 1"),
    ],
)
def test_a_bad_mix_is_refused_naming_what_is_wrong(specs, says):
    with pytest.raises(ValueError, match=says):
        RequestMix.from_specs(**specs)


def test_describe_round_trips_the_weights():
    assert RequestMix.from_specs(sizes="64x64:3,128x128").describe().startswith("sizes=64x64:3,128x128:1 ")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_stops_after_its_last_stage_and_peaks_at_peak_users(profile):
    stages = [stage_at(profile, 16, 10, t) for t in range(0, int(total_seconds(profile, 10)), 5)]
    assert all(stage is not None for stage in stages)
    assert max(users for users, _ in stages) == 16
    assert stage_at(profile, 16, 10, total_seconds(profile, 10)) is None


def test_spawn_rates_stay_within_what_locust_handles():
    assert stage_at("spike", 1000, 10, 15) == (1000, 100.0)
    assert stage_at("ramp", 2, 10, 0) == (1, 2.0)


def test_ramp_rises_and_spike_falls_back():
    ramp = [stage_at("ramp", 16, 1, t + 0.5)[0] for t in range(4)]
    assert ramp == sorted(ramp) and ramp[0] < ramp[-1]
    spike = [stage_at("spike", 16, 1, t + 0.5)[0] for t in range(3)]
    assert spike[0] < spike[1] > spike[2]
