"""Diffusion transformers served like the UNets: FLUX.1 [schnell] (in the demo) and SD 3.5 (added here), through
every API family, the jobs API (progress, cancel), LoRA adapters, and the tutorials' own routes. The served
pixels are the model's own: equal to the same model run in this process."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import openai
import pytest
from harness import wait_until, with_every_family
from helpers import decode, pixels, png

FLUX = "synthetic:tiny-flux-schnell"
SD3 = "synthetic:tiny-sd3"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 4, "seed": 5}


@pytest.fixture(scope="module")
def base_url(deployed_variant):
    return deployed_variant(with_every_family)


@pytest.fixture(scope="module")
def http(base_url):
    import httpx

    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def _native(http, **fields):
    response = http.post("/generate", json={"prompt": "a lighthouse", **SMALL, **fields})
    return pixels(png(response)), response.headers


@pytest.mark.parametrize("model", [FLUX, SD3])
def test_native_images_of_each_family_are_the_models_own(http, model):
    served, headers = _native(http, model=model)
    assert headers["x-model"] == model and served.shape == (64, 64, 3)
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel
    from serve_app.pipeline.params import ImageParams
    from serve_app.pipeline.tasks import ImageTask

    local = LoadedModel.load(model, PipelineOptions(device="cpu", torch_threads=1, max_sequence_length=64))
    [result] = local.generate([ImageTask(ImageParams(prompt="a lighthouse", **SMALL))])
    assert np.abs(served.astype(int) - result.pixels.astype(int)).max() <= 1


def test_models_and_info_name_the_families(http):
    families = {m["id"]: m["family"] for m in http.get("/models").json()["models"]}
    assert families == {"synthetic:tiny": "unet", FLUX: "flux", SD3: "sd3", "synthetic:tiny-inpaint": "unet"}
    _native(http, model=FLUX)
    loaded = http.get("/info").json()["generator"]["models"]["loaded"]
    assert FLUX in loaded


def test_a_unet_sampler_asked_of_a_flow_model_is_a_422_naming_the_ones_it_takes(http):
    response = http.post("/generate", json={"prompt": "a fox", "model": FLUX, "scheduler": "euler_a", **SMALL})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "scheduler" and "flow_euler" in error["message"]


def test_openai_client_generates_with_flux(base_url):
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    result = oai.images.generate(prompt="a fox", model=FLUX, size="64x64", extra_body={"seed": 5})
    assert decode(result.data[0].b64_json).size == (64, 64)


def test_a1111_txt2img_on_sd3_with_a1111_words(http):
    body = {
        "prompt": "a castle",
        "steps": 4,
        "cfg_scale": 5,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",  # on SD3: flow Euler, as Forge means it
        "override_settings": {"sd_model_checkpoint": SD3},
    }
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["sd_model_name"] == SD3 and info["sampler_name"] == "Euler (flow)"


def test_a_lora_adapter_changes_a_flux_image_and_the_prompt_tag_is_the_same_request(http):
    base, _ = _native(http, model=FLUX)
    inked, _ = _native(http, model=FLUX, loras=[{"name": "flux-ink", "scale": 1.0}])
    tagged, _ = _native(http, model=FLUX, prompt="a lighthouse <lora:flux-ink:1>")
    assert np.abs(inked.astype(int) - base.astype(int)).max() > 2
    assert np.array_equal(tagged, inked)
    # An adapter made for another architecture is refused, not silently ignored.
    wrong = http.post("/generate", json={"prompt": "a fox", "model": FLUX, "loras": [{"name": "ink"}], **SMALL})
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "loras"


def test_a_flux_job_reports_progress_and_can_be_cancelled_while_it_runs(http):
    done = http.post("/jobs", json={"prompt": "a harbour", "model": FLUX, **SMALL}).json()
    final = wait_until(
        lambda: (job := http.get(f"/jobs/{done['id']}").json())["status"] in ("succeeded", "failed") and job,
        120,
        "the Flux job ends",
    )
    assert final["status"] == "succeeded" and final["images"][0]["metadata"]["model"] == FLUX

    # Long enough (the demo's most steps) that it is still running when the cancel lands.
    long = http.post("/jobs", json={"prompt": "a harbour", "model": FLUX, **{**SMALL, "num_inference_steps": 50}})
    job_id = long.json()["id"]
    wait_until(lambda: (http.get(f"/jobs/{job_id}").json().get("progress") or {}).get("step", 0) >= 1, 120, "it steps")
    cancelled = http.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "canceled"


def test_the_tutorials_routes_serve_flux(http):
    single = http.get("/generate", params={"prompt": "a fox", "model": FLUX, "steps": 4, "width": 64, "seed": 5})
    assert single.headers["content-type"] == "image/png"
    served = pixels(png(single))
    same, _ = _native(http, model=FLUX, prompt="a fox")
    assert np.array_equal(served, same)  # the same request as POST /generate

    zipped = http.post("/generate_images", json={"prompts": ["a cat", "a dog"], "chunk_size": 2, "model": FLUX})
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    assert len(zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()) == 2
