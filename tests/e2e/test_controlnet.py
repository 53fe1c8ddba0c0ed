"""ControlNet through real Serve on the demo config (synthetic:tiny with two synthetic ControlNets, `edges` and
`scribble`): native /generate and /img2img, the jobs API, AUTOMATIC1111's ControlNet units through the unmodified
`webuiapi` client (and the extension's /controlnet/* routes), canny preprocessing at the ingress, rows with other
ControlNets and none batched together, and the errors. The served pixels are the model's own: equal to the same
model and ControlNets run in this process; that those equal diffusers' ControlNet pipelines:
tests/unit/test_controlnet_stepper.py."""

from __future__ import annotations

import io

import cv2
import httpx
import numpy as np
import pytest
from harness import job_when_final
from helpers import b64, burst, decode, pixels, png
from PIL import Image

SMALL = {"width": 64, "height": 64, "num_inference_steps": 4, "guidance_scale": 7.5, "scheduler": "euler_a"}


def picture(seed: int = 0) -> bytes:
    """A grey scene with a few shapes: what a canny preprocessor finds edges in."""
    rng = np.random.default_rng(seed)
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(4, 40, 2))
        color = tuple(int(c) for c in rng.integers(0, 120, 3))
        cv2.rectangle(image, (x, y), (x + 20, y + 16), color, -1)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def edges_of(data: bytes, low: int = 100, high: int = 200) -> bytes:
    """The canny map of a picture, as a PNG (what `preprocess: canny` makes of it at its own size)."""
    gray = cv2.Canny(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), low, high)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def http(demo_server):
    with httpx.Client(base_url=demo_server, timeout=120) as client:
        yield client


def generate(http, units: list[dict], **fields) -> np.ndarray:
    response = http.post("/generate", json={"prompt": "a house", "seed": 3, **SMALL, "controlnet": units, **fields})
    return pixels(png(response))


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# -- native ---------------------------------------------------------------------------------------------


def test_served_images_are_the_models_own_with_its_controlnets(http):
    units = [{"name": "edges", "image": b64(edges_of(picture())), "scale": 0.8}]
    served = generate(http, units)
    plain = generate(http, [])
    assert diff(served, plain) > 8  # the ControlNet steers the image

    from harness import load_config

    from serve_app.config import AppArgs
    from serve_app.pipeline.model import LoadedModel
    from serve_app.pipeline.params import ImageParams
    from serve_app.pipeline.tasks import ImageTask

    served_model = AppArgs.model_validate(load_config()["applications"][0]["args"]).served_models()[0]
    local = LoadedModel.load(
        served_model.source, served_model.pipeline, served_model.defaults, controlnets=served_model.controlnets
    )
    control = np.asarray(Image.open(io.BytesIO(edges_of(picture()))).convert("RGB"))
    params = ImageParams(prompt="a house", seed=3, **SMALL, controlnet=[{"name": "edges", "scale": 0.8}])
    [result] = local.generate([ImageTask(params, control_images=(control,))])
    assert diff(served, result.pixels) == 0


def test_canny_preprocessing_at_the_ingress_makes_the_map_itself(http):
    from_picture = generate(http, [{"name": "edges", "image": b64(picture(1)), "preprocess": "canny"}])
    from_map = generate(http, [{"name": "edges", "image": b64(edges_of(picture(1)))}])
    assert diff(from_picture, from_map) == 0
    unit = {"name": "edges", "image": b64(picture(1)), "preprocess": "canny", "threshold_a": 900, "threshold_b": 1000}
    lower = generate(http, [unit])  # thresholds above every gradient: no edge at all
    assert diff(lower, from_map) > 0  # the thresholds reach OpenCV


def test_multi_controlnet_windows_and_img2img(http):
    units = [
        {"name": "edges", "image": b64(edges_of(picture(2))), "scale": 0.5, "end": 0.5},
        {"name": "scribble", "image": b64(picture(3)), "preprocess": "scribble_xdog", "scale": 1.2},
    ]
    both = generate(http, units)
    assert diff(both, generate(http, units[:1])) > 0 and diff(both, generate(http, units[1:])) > 0
    body = {"prompt": "a house", "seed": 3, "init_image": b64(picture(4)), "strength": 0.8, "controlnet": units[:1]}
    response = http.post("/img2img", json={**body, "num_inference_steps": 4})
    assert png(response).size == (64, 64)


def test_rows_with_other_controlnets_and_none_share_the_unet_calls(http, demo_server):
    requests = []
    for i in range(6):
        units = [] if i % 3 == 2 else [{"name": ("edges", "scribble")[i % 2], "image": b64(edges_of(picture(i)))}]
        units = [dict(unit, scale=0.5 + 0.2 * i) for unit in units]
        requests.append({"prompt": f"scene {i}", "seed": i, **SMALL, "controlnet": units})
    together = burst(demo_server, [("/generate", body) for body in requests])
    batch_sizes = [int(response.headers["x-batch-size"]) for response in together]
    assert max(batch_sizes) > 1  # they shared calls
    for body, response in zip(requests, together):
        alone = pixels(png(http.post("/generate", json=body)))
        assert diff(pixels(png(response)), alone) <= 1


def test_listing_and_memory(http):
    listing = http.get("/controlnets").json()
    assert [entry["name"] for entry in listing["models"]["synthetic:tiny"]["controlnets"]] == ["edges", "scribble"]
    info = http.get("/info").json()["generator"]
    nets = {entry["name"]: entry for entry in info["controlnets"]}
    assert set(nets) == {"edges", "scribble"} and all(entry["memory_bytes"] > 1_000_000 for entry in nets.values())


# -- jobs ------------------------------------------------------------------------------------------


def test_a_job_runs_with_its_stored_control_maps(http):
    units = [{"name": "scribble", "image": b64(picture(5)), "preprocess": "canny", "scale": 0.7}]
    body = {"prompt": "a house", "seed": 3, **SMALL, "controlnet": units}
    job = http.post("/jobs", json=body).json()
    final = job_when_final(http, job["id"])
    assert final["status"] == "succeeded", final
    assert final["params"]["controlnet"][0]["name"] == "scribble"
    stored = pixels(decode(http.get(f"/jobs/{job['id']}/images/0").content))
    assert diff(stored, generate(http, units)) == 0


# -- AUTOMATIC1111 through the unmodified webuiapi client -------------------------------------------------


@pytest.fixture
def webui(demo_server):
    import webuiapi

    host, port = demo_server.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)


def test_webuiapi_controlnet_units(webui, http):
    import webuiapi

    assert webui.controlnet_version() == 2
    assert webui.controlnet_model_list() == ["edges", "scribble"]
    assert "canny" in webui.controlnet_module_list()
    detected = webui.controlnet_detect([Image.open(io.BytesIO(picture(6)))], module="canny", processor_res=64)
    edges = np.asarray(detected.images[0].convert("RGB"))
    assert np.array_equal(edges, np.asarray(Image.open(io.BytesIO(edges_of(picture(6), 64, 64))).convert("RGB")))

    unit = webuiapi.ControlNetUnit(
        image=Image.open(io.BytesIO(picture(6))), module="canny", model="edges", weight=0.7, pixel_perfect=True
    )
    # webuiapi keeps units in its default alwayson_scripts dict between calls: give each call a fresh one.
    result = webui.txt2img(
        prompt="a house", seed=3, width=64, height=64, cfg_scale=7.5, controlnet_units=[unit], alwayson_scripts={}
    )
    # The same request in the native API: webuiapi's defaults (canny thresholds 64/64, Resize and Fill).
    native = {"name": "edges", "image": b64(picture(6)), "preprocess": "canny", "scale": 0.7}
    native.update(threshold_a=64, threshold_b=64, resize_mode="fill")
    assert diff(pixels(result.image), generate(http, [native])) == 0


def test_webuiapi_refusals_name_the_field(webui):
    import webuiapi

    image = Image.open(io.BytesIO(picture(7)))
    unknown = webuiapi.ControlNetUnit(image=image, model="control_v11p_sd15_openpose")
    with pytest.raises(RuntimeError, match=r"args\.0\.model.*edges, scribble"):
        webui.txt2img(prompt="x", width=64, height=64, controlnet_units=[unknown], alwayson_scripts={})
    window = webuiapi.ControlNetUnit(image=image, model="edges", guidance_start=0.7, guidance_end=0.3)
    with pytest.raises(RuntimeError, match=r"args\.0\.guidance_end"):
        webui.txt2img(prompt="x", width=64, height=64, controlnet_units=[window], alwayson_scripts={})


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit,field",
    [
        ({"name": "depth"}, "controlnet.0.name"),
        ({"name": "edges", "start": 0.5, "end": 0.5}, "controlnet.0.end"),
        ({"name": "edges", "image": "bm90IGFuIGltYWdl"}, "controlnet.0.image"),
    ],
)
def test_errors_name_the_unit(http, unit, field):
    response = http.post("/generate", json={"prompt": "x", "controlnet": [{"image": b64(picture()), **unit}]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    if field.endswith("name"):
        assert "edges, scribble" in error["message"]
