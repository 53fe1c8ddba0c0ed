"""LoRA adapters on the real tiny model: synthetic adapters are real adapter files, and applying them per
row (several adapter sets and scales in one UNet call) gives each image what diffusers gives it alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_through_loop

from serve_app.pipeline.adapters import AdapterCatalog, AdapterSettings, SyntheticAdapter, write_synthetic_adapter
from serve_app.pipeline.errors import InvalidTaskError
from serve_app.pipeline.params import ImageParams, split_lora_tags
from serve_app.pipeline.tasks import ImageResult, ImageTask

ADAPTERS = [SyntheticAdapter(name="ink", seed=1), SyntheticAdapter(name="neon", seed=2, rank=8)]


def _engine(**settings):
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel

    options = PipelineOptions(device="cpu", torch_threads=1)
    return LoadedModel.load("synthetic:tiny", options, adapters=AdapterSettings(synthetic=ADAPTERS, **settings))


@pytest.fixture(scope="module")
def model():
    return _engine()


def _job(seed: int, *loras: tuple[str, float], steps: int = 3, guidance: float | None = None) -> ImageTask:
    params = ImageParams(
        prompt=f"a lighthouse {seed}",
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        loras=[{"name": name, "scale": scale} for name, scale in loras],
    )
    return ImageTask(params)


def _pixels(result) -> np.ndarray:
    assert isinstance(result, ImageResult), result
    return result.pixels.astype(int)


@pytest.mark.slow  # seconds: out of the fast loop
def test_a_synthetic_adapter_is_a_diffusers_lora_file_written_once_and_the_same_everywhere(tmp_path):
    from safetensors.torch import load_file

    first = write_synthetic_adapter(ADAPTERS[0], tmp_path / "a")
    again = write_synthetic_adapter(ADAPTERS[0], tmp_path / "b")
    assert first.read_bytes() == again.read_bytes()
    weights = load_file(first)
    assert weights and all(key.startswith("unet.") and "lora" in key for key in weights)
    assert write_synthetic_adapter(ADAPTERS[0], tmp_path / "a") == first  # found, not rewritten


def test_an_adapter_applied_per_row_gives_diffusers_own_image_and_scale_zero_gives_the_base(model):
    base, inked, half, zero = model.generate(
        [_job(1), _job(1, ("ink", 1.0)), _job(1, ("ink", 0.5)), _job(1, ("ink", 0))]
    )
    assert np.abs(_pixels(inked) - _pixels(base)).max() > 10  # the adapter changes the picture
    assert np.array_equal(_pixels(zero), _pixels(base))
    pipe = model.pipe
    with torch.inference_mode():
        pipe.set_adapters(["ink"], [0.5])
        model.adapters._active = None  # diffusers' own scaling, not the mixer's, for the reference
        model.adapters._scales = {"ink": torch.ones(1)}
        reference = pipe(
            "a lighthouse 1", num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np"
        ).images[0]
        model.adapters._scales = {}
    reference = (reference * 255).round().clip(0, 255).astype(int)
    assert np.abs(_pixels(half) - reference).max() <= 1


def test_different_adapter_sets_share_one_unet_call_and_each_image_is_the_one_it_makes_alone(model):
    jobs = [
        _job(1),
        _job(2, ("ink", 1.0)),
        _job(3, ("ink", 0.5), ("neon", 1.0), guidance=5.0),
        _job(4, ("neon", -0.7), steps=5),
    ]
    alone = [model.generate([job])[0] for job in jobs]
    results, counters = run_through_loop(model, "step", jobs)
    for one, together in zip(alone, results):
        assert np.abs(_pixels(one) - _pixels(together)).max() <= 1
    assert max(int(k) for k in counters.snapshot()["model_calls_by_batch_size"]) == 4  # all four, one call


def test_grouped_batching_keeps_adapter_sets_apart_and_makes_the_same_images():
    grouped = _engine(batching="grouped")
    jobs = [_job(1), _job(2, ("ink", 1.0)), _job(3, ("ink", 1.0)), _job(4, ("neon", 1.0))]
    mixed, _ = run_through_loop(_engine(), "step", jobs)
    results, counters = run_through_loop(grouped, "step", jobs)
    for a, b in zip(mixed, results):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    assert max(int(k) for k in counters.snapshot()["model_calls_by_batch_size"]) == 2  # the two ink images


def test_past_the_cap_the_least_recently_used_adapter_is_unloaded_and_reloads_when_asked_again():
    model = _engine(max_loaded=1)
    for name in ("ink", "neon", "ink"):
        assert isinstance(model.generate([_job(1, (name, 1.0))])[0], ImageResult)
    assert model.adapters.describe() == {"loaded": ["ink"], "loads": 3, "evictions": 2}


def _as_kohya(diffusers_file, kohya_file) -> None:
    """The same adapter in kohya's naming (sd-scripts): lora_unet_<module path>.lora_down/lora_up, alpha = rank."""
    from safetensors.torch import load_file, save_file

    converted = {}
    for key, weights in load_file(diffusers_file).items():
        module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)  # kind: "A.weight" (down) or "B.weight" (up)
        name = "lora_unet_" + module.replace(".", "_")
        converted[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = weights
        if kind.startswith("A"):
            converted[f"{name}.alpha"] = torch.tensor(float(weights.shape[0]))
    save_file(converted, kohya_file)


def test_adapter_files_in_the_directory_in_diffusers_or_kohya_format_make_the_same_image(tmp_path):
    import shutil

    written = write_synthetic_adapter(ADAPTERS[0], tmp_path / "written")
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(written, folder / "sketch.safetensors")
    _as_kohya(written, folder / "kohya-sketch.safetensors")
    catalog = AdapterCatalog(str(folder), ADAPTERS)
    assert catalog.names() == ["ink", "kohya-sketch", "neon", "sketch"]
    assert {entry["name"]: entry["source"] for entry in catalog.describe()}["sketch"] == "file"

    model = _engine(directory=str(folder))
    inked, sketched, kohya = model.generate([_job(1, (name, 1.0)) for name in ("ink", "sketch", "kohya-sketch")])
    assert np.array_equal(_pixels(sketched), _pixels(inked)) and np.array_equal(_pixels(kohya), _pixels(inked))


def test_the_directory_listing_is_read_again_once_it_is_older_than_its_time_to_live(tmp_path, monkeypatch):
    monkeypatch.setattr(AdapterCatalog, "LISTING_TTL_S", 3600.0)
    catalog = AdapterCatalog(str(tmp_path))
    assert catalog.names() == []
    write_synthetic_adapter(ADAPTERS[0], tmp_path).rename(tmp_path / "late.safetensors")
    assert catalog.names() == []  # listed moments ago: not read again per request
    monkeypatch.setattr(AdapterCatalog, "LISTING_TTL_S", 0.0)
    assert catalog.names() == ["late"]


def test_an_unknown_adapter_fails_its_job_naming_the_field(model):
    [result] = model.generate([_job(1, ("nope", 1.0))])
    assert isinstance(result, InvalidTaskError) and result.field == "loras" and "ink, neon" in result.message
    assert AdapterCatalog(None, ADAPTERS).names() == ["ink", "neon"]


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a castle <lora:ink:0.7>, night", "a castle, night", [("ink", "0.7")]),
        ("<lora:ink> a castle <lora:neon:1>", "a castle", [("ink", None), ("neon", "1")]),
        ("no tags here", "no tags here", []),
    ],
)
def test_lora_tags_leave_the_prompt_the_model_reads(prompt, text, tags):
    assert split_lora_tags(prompt) == (text, tags)
