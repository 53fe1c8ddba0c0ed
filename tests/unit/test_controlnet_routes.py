"""ControlNet at the HTTP edge of every family, over a fake Generator: what reaches the engine (each unit's control
map as an array of the output's size, preprocessed; the units in the shared record) and the 4xx that name the
field. The pictures themselves: tests/unit/test_controlnet_stepper.py and tests/e2e/test_controlnet.py."""

from __future__ import annotations

import base64
import io
import json

import cv2
import numpy as np
import pytest
from helpers import b64, error_of
from PIL import Image

from serve_app.pipeline.params import ControlNetUnit


def box_png(size=(64, 64), box=(16, 16, 48, 40), mode="RGB") -> bytes:
    picture = Image.new(mode, size, 0 if mode != "RGB" else (0, 0, 0))
    picture.paste((255, 255, 255) if mode == "RGB" else 255, box)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# -- native -----------------------------------------------------------------------------------------


def test_generate_hands_the_engine_the_units_and_their_maps(client, generator):
    body = {
        "prompt": "a house",
        "seed": 1,
        "width": 64,
        "height": 64,
        "controlnet": [
            {"name": "edges", "image": b64(box_png()), "scale": 0.6, "start": 0.1, "end": 0.9},
            {"name": "scribble", "image": b64(box_png()), "preprocess": "canny", "control_mode": "balanced"},
        ],
    }
    response = client.post("/generate", json=body, headers={"accept": "application/json"})
    assert response.status_code == 200, response.text
    [task] = generator.jobs
    assert [unit.name for unit in task.params.controlnet] == ["edges", "scribble"]
    assert task.params.controlnet[0] == ControlNetUnit(name="edges", scale=0.6, start=0.1, end=0.9)
    first, second = task.control_images
    assert first.shape == second.shape == (64, 64, 3) and first.dtype == np.uint8
    assert first[20, 20].tolist() == [255, 255, 255]  # the map as sent
    assert np.array_equal(second[..., 0], cv2.Canny(np.asarray(Image.open(io.BytesIO(box_png()))), 100, 200))
    metadata = response.json()["metadata"]
    assert metadata["controlnet"][0]["name"] == "edges" and "image" not in metadata["controlnet"][0]


def test_without_a_size_the_first_control_image_sets_it(client, generator):
    body = {"prompt": "x", "controlnet": [{"name": "edges", "image": b64(box_png((128, 96)))}]}
    assert client.post("/generate", json=body).status_code == 200
    [task] = generator.jobs
    assert (task.params.width, task.params.height) == (128, 96)
    assert task.control_images[0].shape == (96, 128, 3)


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_a_control_image_is_fitted_to_the_output(client, generator, mode):
    body = {
        "prompt": "x",
        "width": 64,
        "height": 64,
        "controlnet": [{"name": "edges", "image": b64(box_png((128, 64))), "resize_mode": mode}],
    }
    assert client.post("/generate", json=body).status_code == 200
    assert generator.jobs[0].control_images[0].shape == (64, 64, 3)


def test_img2img_fits_the_maps_to_the_init_image(client, generator):
    body = {
        "prompt": "x",
        "init_image": b64(box_png((96, 64))),
        "controlnet": [{"name": "scribble", "image": b64(box_png()), "preprocess": "invert"}],
    }
    assert client.post("/img2img", json=body).status_code == 200, client
    [task] = generator.jobs
    assert task.init_image.shape == task.control_images[0].shape == (64, 96, 3)
    assert task.control_images[0][0, 0].tolist() == [255, 255, 255]  # inverted


def test_multipart_img2img_takes_units_as_json(client, generator):
    units = json.dumps([{"name": "edges", "image": b64(box_png())}])
    files = {"init_image": ("init.png", box_png(), "image/png")}
    response = client.post("/img2img", data={"prompt": "x", "controlnet": units}, files=files)
    assert response.status_code == 200, response.text
    assert len(generator.jobs[0].control_images) == 1


def test_generate_prompts_entries_carry_their_own_units(client, generator):
    body = {
        "requests": [
            {"prompt": "a", "controlnet": [{"name": "edges", "image": b64(box_png())}]},
            {"prompt": "b"},
        ],
        "width": 64,
        "height": 64,
    }
    assert client.post("/generate/prompts", json=body).status_code == 200
    assert [len(task.control_images) for task in generator.jobs] == [1, 0]


@pytest.mark.parametrize(
    "unit,field,words",
    [
        ({"name": "pose"}, "controlnet.0.name", "edges, scribble"),
        ({"name": "edges", "start": 0.6, "end": 0.5}, "controlnet.0.end", "after start"),
        ({"name": "edges", "scale": 3}, "controlnet.0.scale", "2"),
        ({"name": "edges", "preprocess": "depth"}, "controlnet.0.preprocess", "canny"),
        ({"name": "edges", "image": "not base64!"}, "controlnet.0.image", "base64"),
        ({"name": "edges", "image": b64(box_png(mode="I;16"))}, "controlnet.0.image", "mode"),
    ],
)
def test_bad_units_are_422_naming_the_field(client, unit, field, words):
    body = {"prompt": "x", "controlnet": [{"image": b64(box_png()), **unit}]}
    error = error_of(client.post("/generate", json=body))
    assert error["field"] == field and words in error["message"], error


def test_units_do_not_combine_with_hires_or_masks(client):
    unit = {"name": "edges", "image": b64(box_png())}
    error = error_of(client.post("/generate", json={"prompt": "x", "controlnet": [unit], "hires": {"scale": 2}}))
    assert error["field"] == "hires"
    body = {"prompt": "x", "init_image": b64(box_png()), "mask": b64(box_png(mode="L")), "controlnet": [unit]}
    assert error_of(client.post("/img2img", json=body))["field"] == "mask"


def test_a_flow_model_has_no_controlnets(client):
    body = {"prompt": "x", "model": "synthetic:tiny-flux-schnell", "controlnet": [{"name": "edges", "image": "x"}]}
    error = error_of(client.post("/generate", json=body))
    assert error["field"] == "controlnet.0.name" and "serves none" in error["message"], error


def test_get_controlnets_lists_each_models(client):
    listing = client.get("/controlnets").json()
    tiny = listing["models"]["synthetic:tiny"]
    assert [entry["name"] for entry in tiny["controlnets"]] == ["edges", "scribble"]
    assert tiny["batching"] == "mixed"
    assert listing["models"]["synthetic:tiny-flux-schnell"]["controlnets"] == []
    assert "canny" in listing["preprocessors"]


# -- jobs -------------------------------------------------------------------------------------------


def test_a_job_stores_its_maps_and_runs_with_them(client):
    """The jobs API's unit fields are /generate's (the job's own run: tests/e2e/test_controlnet.py)."""
    body = {"prompt": "x", "controlnet": [{"name": "nope", "image": b64(box_png())}]}
    error = error_of(client.post("/jobs", json=body))
    assert error["field"] == "controlnet.0.name"


# -- AUTOMATIC1111 ------------------------------------------------------------------------------------


def a1111_unit(**fields) -> dict:
    """What webuiapi 0.9.17's ControlNetUnit(...).to_dict() sends by default."""
    unit = {
        "image": b64(box_png()),
        "mask": None,
        "module": "none",
        "model": "edges",
        "weight": 1.0,
        "resize_mode": "Resize and Fill",
        "low_vram": False,
        "processor_res": 512,
        "threshold_a": 64,
        "threshold_b": 64,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": "Balanced",
        "pixel_perfect": False,
        "hr_option": "Both",
        "enabled": True,
    }
    unit.update(fields)
    return unit


def a1111_body(*units, **fields) -> dict:
    return {
        "prompt": "x",
        "width": 64,
        "height": 64,
        "alwayson_scripts": {"ControlNet": {"args": list(units)}},
        **fields,
    }


def test_a1111_units_reach_the_engine(client, generator):
    units = [
        a1111_unit(model="edges [abc123]", weight=0.5, guidance_start=0.2, control_mode=2),
        a1111_unit(
            model="scribble", module="canny", threshold_a=50, threshold_b=150, control_mode=2, pixel_perfect=True
        ),
        a1111_unit(enabled=False, model="whatever"),
    ]
    response = client.post("/sdapi/v1/txt2img", json=a1111_body(*units))
    assert response.status_code == 200, response.text
    [task] = generator.jobs
    first, second = task.params.controlnet
    assert (first.name, first.scale, first.start, first.control_mode) == ("edges", 0.5, 0.2, "control")
    assert first.resize_mode == "fill" and first.processor_res == 512
    assert (second.preprocess, second.threshold_a, second.threshold_b, second.processor_res) == ("canny", 50, 150, None)
    edges = cv2.Canny(np.asarray(Image.open(io.BytesIO(box_png()))), 50, 150)
    assert np.array_equal(task.control_images[1][..., 0], edges)


def test_a1111_img2img_unit_without_image_reads_the_init_image(client, generator):
    unit = a1111_unit(image="", module="invert (from white bg & black line)", pixel_perfect=True)
    body = a1111_body(unit, init_images=[b64(box_png())])
    assert client.post("/sdapi/v1/img2img", json=body).status_code == 200
    [task] = generator.jobs
    assert np.array_equal(task.control_images[0], 255 - task.init_image)


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"model": "pose"}, "alwayson_scripts.ControlNet.args.0.model"),
        ({"model": "None"}, "alwayson_scripts.ControlNet.args.0.model"),
        ({"module": "openpose"}, "alwayson_scripts.ControlNet.args.0.module"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "alwayson_scripts.ControlNet.args.0.guidance_end"),
        ({"weight": 5}, "alwayson_scripts.ControlNet.args.0.weight"),
        ({"control_mode": "Louder"}, "alwayson_scripts.ControlNet.args.0.control_mode"),
        ({"mask": b64(box_png())}, "alwayson_scripts.ControlNet.args.0.mask"),
        ({"image": ""}, "alwayson_scripts.ControlNet.args.0.image"),
        ({"loopback": True}, "alwayson_scripts.ControlNet.args.0.loopback"),
    ],
)
def test_a1111_bad_units_name_their_field(client, fields, field):
    error = error_of(client.post("/sdapi/v1/txt2img", json=a1111_body(a1111_unit(**fields))))
    assert error["field"] == field, error


@pytest.mark.parametrize(
    "scripts,field",
    [
        ({"ControlNet": True}, "alwayson_scripts.ControlNet.args"),
        ({"ControlNet": {"args": 3}}, "alwayson_scripts.ControlNet.args"),
        ({"Refiner": {"args": True}}, "alwayson_scripts.Refiner.args"),
        ({"Refiner": [True]}, "alwayson_scripts.Refiner"),
    ],
)
def test_a1111_script_entries_that_are_not_argument_lists_are_422s(client, scripts, field):
    body = {"prompt": "a castle", "steps": 2, "width": 64, "height": 64, "alwayson_scripts": scripts}
    error = error_of(client.post("/sdapi/v1/txt2img", json=body))
    assert error["field"] == field, error


def test_a1111_controlnet_extension_routes(client):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/model_list").json() == {"model_list": ["edges", "scribble"]}
    modules = client.get("/controlnet/module_list").json()
    assert "canny" in modules["module_list"] and "canny" in modules["module_detail"]
    body = {"controlnet_module": "canny", "controlnet_input_images": [b64(box_png())], "controlnet_processor_res": 64}
    detected = client.post("/controlnet/detect", json=body).json()
    assert detected["info"] == "Success"
    edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(detected["images"][0]))).convert("L"))
    assert np.array_equal(edges, cv2.Canny(np.asarray(Image.open(io.BytesIO(box_png()))), 100, 200))
    older = {"controlnet_module": "invert", "controlnet_images": ["data:image/png;base64," + b64(box_png())]}
    assert len(client.post("/controlnet/detect", json=older).json()["images"]) == 1
    error = error_of(client.post("/controlnet/detect", json={**body, "controlnet_module": "depth"}))
    assert error["field"] == "controlnet_module"


def test_the_units_are_written_into_the_images_parameters(client):
    unit = a1111_unit(model="edges", module="canny", threshold_a=50, threshold_b=150, weight=0.5, control_mode=1)
    result = client.post("/sdapi/v1/txt2img", json=a1111_body(unit)).json()
    info = json.loads(result["info"])
    written = info["extra_generation_params"]["ControlNet 0"]
    assert written.startswith("Module: canny, Model: edges, Weight: 0.5, Resize Mode: Resize and Fill")
    assert "Threshold A: 50, Threshold B: 150" in written and written.endswith(
        "Control Mode: My prompt is more important"
    )
    assert f'ControlNet 0: "{written}"' in info["infotexts"][0]
    native = {"prompt": "x", "controlnet": [{"name": "scribble", "image": b64(box_png())}]}
    picture = Image.open(io.BytesIO(client.post("/generate", json=native).content))
    assert 'ControlNet 0: "Module: none, Model: scribble, Weight: 1' in picture.info["parameters"]
