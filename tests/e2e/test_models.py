"""Several models and LoRA adapters on one deployment: two synthetic models (same architecture, other
weights), a toy SDXL with its refiner, and synthetic adapters, two Generator replicas holding one model each (cap 1), routed by
Serve's model multiplexing. What a request names decides its image; what it names decides its replica."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from harness import TWO_TINY_MODELS, deployment, serve_models, wait_until
from helpers import pixels, png
from PIL import Image

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def _models_and_adapters(config: dict) -> None:
    """Three models (tiny-xl with a refiner and its own step limit), one per replica, on two replicas; two
    synthetic adapters. Deploying it restarts the replicas."""
    xl = {
        "id": "tiny-xl",
        "model": "synthetic:tiny-xl",
        "refiner": "synthetic:tiny-xl-refiner",
        "limits": {"max_steps": 20},
    }
    serve_models(config, [*TWO_TINY_MODELS, xl], max_per_replica=1)
    args = config["applications"][0]["args"]
    args["loras"] = {"synthetic": [{"name": "ink", "seed": 1}, {"name": "neon", "seed": 2}]}
    generator = deployment(config, "ImageGenerator")
    generator["num_replicas"] = 2


@pytest.fixture(scope="module")
def http(deployed_variant):
    import httpx

    with httpx.Client(base_url=deployed_variant(_models_and_adapters), timeout=120) as client:
        yield client


def _image(http, **fields):
    response = http.post("/generate", json={"prompt": "a lighthouse", "seed": 7, **SMALL, **fields})
    return pixels(png(response)), response.headers


def test_the_model_and_adapters_named_decide_the_image(http):
    base, headers = _image(http)
    assert headers["x-model"] == "tiny"  # the default, unnamed
    assert np.array_equal(_image(http, model="tiny")[0], base)
    other, headers = _image(http, model="tiny-b")
    assert headers["x-model"] == "tiny-b" and not np.array_equal(other, base)
    inked, _ = _image(http, loras=[{"name": "ink", "scale": 1.0}])
    assert not np.array_equal(inked, base)
    # A1111's prompt syntax is the same request: the tag leaves the text the model reads.
    tagged, _ = _image(http, prompt="a lighthouse <lora:ink:1>")
    assert np.array_equal(tagged, inked)
    mixed, _ = _image(http, loras=[{"name": "ink", "scale": 0.5}, {"name": "neon"}])
    assert not np.array_equal(mixed, inked)


def test_requests_for_a_model_land_on_the_replica_that_holds_it_with_no_reload(http):
    replicas = {}
    for model in ("tiny", "tiny-b"):
        _, headers = _image(http, model=model)
        replicas[model] = headers["x-generator-replica"]
    for model in ("tiny", "tiny-b", "tiny", "tiny-b"):
        _, headers = _image(http, model=model, seed=11)
        assert headers["x-generator-replica"] == replicas[model]
    assert replicas["tiny"] != replicas["tiny-b"]  # one model per replica (cap 1): each went where it was


def test_a_third_model_evicts_the_least_recently_used_at_the_cap(http):
    _image(http, model="tiny")
    _image(http, model="tiny-b")
    _, headers = _image(http, model="tiny-xl")

    def evicted():
        infos = [http.get("/info").json()["generator"] for _ in range(6)]  # either replica answers
        return next((i for i in infos if i["replica"] == headers["x-generator-replica"]), None)

    info = wait_until(lambda: (i := evicted()) and i["models"]["evictions"] >= 1 and i, 30, "an eviction on it")
    assert list(info["models"]["loaded"]) == ["tiny-xl"] and info["models"]["max_per_replica"] == 1


def test_every_api_family_selects_the_model(http):
    listed = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["tiny", "tiny-b", "tiny-xl"]
    assert [m["title"] for m in http.get("/sdapi/v1/sd-models").json()] == ["tiny", "tiny-b", "tiny-xl"]
    native, _ = _image(http, model="tiny-b", prompt="a fox", seed=3)
    openai = http.post(
        "/v1/images/generations",
        json={"prompt": "a fox", "model": "tiny-b", "seed": 3, "size": "64x64", "num_inference_steps": 2},
    ).json()
    a1111 = http.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a fox",
            "seed": 3,
            "width": 64,
            "height": 64,
            "steps": 2,
            "override_settings": {"sd_model_checkpoint": "tiny-b"},
        },
    ).json()
    for b64 in (openai["data"][0]["b64_json"], a1111["images"][0]):
        assert np.array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(b64)))), native)
    assert [entry["name"] for entry in http.get("/loras").json()["loras"]] == ["ink", "neon"]
    assert [entry["name"] for entry in http.get("/sdapi/v1/loras").json()] == ["ink", "neon"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"model": "nope"}, "model"),
        ("/v1/images/generations", {"model": "nope"}, "model"),
        ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings"),
        ("/generate", {"loras": [{"name": "nope"}]}, "loras"),
        ("/generate", {"loras": [{"name": "ink", "scale": 50}]}, "loras.0.scale"),
        ("/generate", {"prompt": "x <lora:nope:1>"}, "loras"),
        ("/generate", {"refiner": {}}, "refiner"),
        ("/generate", {"model": "tiny-xl", "refiner": {"denoising_start": 1.5}}, "refiner.denoising_start"),
    ],
)
def test_an_unknown_model_adapter_or_refiner_or_a_value_out_of_range_is_a_422_naming_the_field(http, path, body, field):
    response = http.post(path, json={"prompt": "a fox", **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error.get("field") or error.get("param")).startswith(field)  # OpenAI names it `param`
    if field in ("model", "override_settings"):  # an unknown model: the answer lists the ones there are
        assert "tiny, tiny-b, tiny-xl" in error["message"]


def _finished(http, job_id: str) -> dict:
    return wait_until(
        lambda: (job := http.get(f"/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and job,
        60,
        f"job {job_id} finishes",
    )


def test_the_refiner_finishes_text_to_image_and_redoes_an_uploaded_or_stored_image(http):
    xl = {"model": "tiny-xl", "num_inference_steps": 4}
    base, _ = _image(http, **xl)
    refined, _ = _image(http, **xl, refiner={"denoising_start": 0.5})
    assert np.abs(refined - base).max() > 5
    uploaded = http.post(
        "/img2img",
        json={
            "prompt": "at night",
            "seed": 7,
            "strength": 0.5,
            **xl,
            "refiner": {},
            "init_image": base64.b64encode(_png(base)).decode(),
        },
    )
    assert np.abs(pixels(png(uploaded)) - base).max() > 5
    job = _finished(http, http.post("/jobs", json={"prompt": "a lighthouse", "seed": 7, **SMALL, **xl}).json()["id"])
    again = _finished(http, http.post(f"/jobs/{job['id']}/refine", json={"strength": 0.5}).json()["id"])
    assert again["status"] == "succeeded" and again["params"]["refiner"] == {"denoising_start": None}
    assert again["refined_from"] == f"{job['id']}/0" and again["params"]["model"] == "tiny-xl"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_web_page_offers_every_model_with_its_own_limits_and_sends_the_one_chosen(http, open_page):
    from playwright.sync_api import expect

    page = open_page(str(http.base_url))
    expect(page.locator("#model-field")).to_be_visible()
    expect(page.locator("#model option")).to_have_text(["tiny (default)", "tiny-b", "tiny-xl"])
    page.select_option("#model", "tiny-xl")
    expect(page.locator("#limits-hint")).to_contain_text("up to 20 steps")  # its own limits
    page.select_option("#model", "tiny-b")
    expect(page.locator("#limits-hint")).to_contain_text("up to 50 steps")
    page.fill("#prompt", "a fox")
    page.fill("#seed", "3")
    page.click("#generate")
    card = page.locator("#gallery .job").first.locator(".card:not(.pending)")
    expect(card).to_contain_text("tiny-b")
    job = http.get(f"/jobs/{page.locator('#gallery .job').first.get_attribute('data-job')}").json()
    assert job["params"]["model"] == "tiny-b"
