"""LoRA adapters on SD3 and FLUX.1 transformers: synthetic adapters are real adapter files, kohya files load too,
and applying adapters per row (several adapter sets and scales in one transformer call) gives each image what
diffusers gives it alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_through_loop

from serve_app.pipeline.adapters import AdapterSettings, SyntheticAdapter, write_synthetic_adapter
from serve_app.pipeline.errors import InvalidTaskError
from serve_app.pipeline.loading import PipelineOptions
from serve_app.pipeline.model import LoadedModel
from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageResult, ImageTask, to_uint8


def adapters_for(preset: str) -> list[SyntheticAdapter]:
    return [
        SyntheticAdapter(name="ink", preset=preset, seed=1),
        SyntheticAdapter(name="neon", preset=preset, seed=2, rank=8),
    ]


def load(preset: str, **settings) -> LoadedModel:
    options = PipelineOptions(device="cpu", torch_threads=1)
    adapters = AdapterSettings(synthetic=adapters_for(preset), **settings)
    return LoadedModel.load(f"synthetic:{preset}", options, adapters=adapters)


@pytest.fixture(scope="module")
def models():
    return {"sd3": load("tiny-sd3"), "flux-dev": load("tiny-flux-dev")}


def job(seed: int, *loras: tuple[str, float], steps: int = 3, **params) -> ImageTask:
    params = ImageParams(
        prompt=f"a lighthouse {seed}",
        seed=seed,
        num_inference_steps=steps,
        loras=[{"name": name, "scale": scale} for name, scale in loras],
        **params,
    )
    return ImageTask(params)


def pixels(result) -> np.ndarray:
    assert isinstance(result, ImageResult), result
    return result.pixels.astype(int)


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux-dev"])
def test_a_synthetic_transformer_adapter_is_a_diffusers_lora_file(tmp_path, preset):
    from safetensors.torch import load_file

    weights = load_file(write_synthetic_adapter(adapters_for(preset)[0], tmp_path))
    assert weights and all(key.startswith("transformer.transformer_blocks.") and "lora" in key for key in weights)
    assert any(".attn.add_q_proj." in key for key in weights)  # the text side of the joint attention too


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_an_adapter_applied_per_row_gives_diffusers_own_image(models, family, record_property):
    model = models[family]
    base, inked, half, zero = model.generate([job(1), job(1, ("ink", 1.0)), job(1, ("ink", 0.5)), job(1, ("ink", 0))])
    assert np.abs(pixels(inked) - pixels(base)).max() > 2  # the adapter changes the picture
    assert np.abs(pixels(zero) - pixels(base)).max() <= 1  # scale 0 is the base model (rows round by position)
    pipe = model.pipe
    with torch.inference_mode():
        pipe.set_adapters(["ink"], [0.5])
        model.adapters._active = None  # diffusers' own scaling, not the mixer's, for the reference
        model.adapters._scales = {"ink": torch.ones(1)}
        reference = pipe(
            "a lighthouse 1",
            num_inference_steps=3,
            guidance_scale=model.defaults.guidance_scale,
            width=64,
            height=64,
            max_sequence_length=model.max_sequence_length,
            generator=torch.Generator().manual_seed(1),
            output_type="np",
        ).images
        model.adapters._scales = {}
    diff = int(np.abs(pixels(half) - to_uint8(reference)[0].astype(int)).max())
    record_property(f"max_diff_adapter_half_scale[{family}]", diff)
    assert diff <= 1


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_different_adapter_sets_share_one_transformer_call_and_each_image_is_the_one_it_makes_alone(
    models, family, record_property
):
    model = models[family]
    jobs = [
        job(1),
        job(2, ("ink", 1.0)),
        job(3, ("ink", 0.5), ("neon", 1.0), guidance_scale=5.0),
        job(4, ("neon", -0.7), steps=5),
    ]
    if family == "flux-dev":
        jobs.append(job(5, ("ink", 1.0), true_cfg_scale=3.0, negative_prompt="fog"))  # adapters on the second call
    alone = [model.generate([j])[0] for j in jobs]
    results, counters = run_through_loop(model, "step", jobs)
    diffs = [int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(alone, results)]
    record_property(f"max_diff_adapters_mixed[{family}]", max(diffs))
    assert max(diffs) <= 1
    assert max(int(k) for k in counters.snapshot()["model_calls_by_batch_size"]) == len(jobs)  # all in one call


def _fused(down: list[torch.Tensor], up: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k and v adapters as one adapter of the fused qkv projection (kohya's layout): the downs stacked, the ups
    block-diagonal (exactly the three adapters, at rank 3r)."""
    rank, width = down[0].shape[0], up[0].shape[0]
    fused_up = torch.zeros(3 * width, 3 * rank)
    for i, part in enumerate(up):
        fused_up[i * width : (i + 1) * width, i * rank : (i + 1) * rank] = part
    return torch.cat(down), fused_up


def _as_kohya(diffusers_file, kohya_file, family: str) -> None:
    """The same adapter in kohya's naming (sd-scripts), fused qkv included: FLUX.1 `lora_unet_double_blocks_<i>_
    <img|txt>_attn_<qkv|proj>`, SD3 `lora_unet_joint_blocks_<i>_<x|context>_block_attn_<qkv|proj>`."""
    from safetensors.torch import load_file, save_file

    weights = load_file(diffusers_file)
    sides = {
        "flux": ("double_blocks_{}_img_attn", "double_blocks_{}_txt_attn"),
        "sd3": ("joint_blocks_{}_x_block_attn", "joint_blocks_{}_context_block_attn"),
    }[family]
    projections = {
        "to_q": (0, 0),
        "to_k": (0, 1),
        "to_v": (0, 2),
        "add_q_proj": (1, 0),
        "add_k_proj": (1, 1),
        "add_v_proj": (1, 2),
    }
    outputs = {"to_out.0": 0, "to_add_out": 1}
    blocks = sorted({int(key.split(".")[2]) for key in weights})
    converted = {}
    for block in blocks:
        prefix = f"transformer.transformer_blocks.{block}.attn."
        for side in (0, 1):
            names = [n for n, (s, _) in projections.items() if s == side]
            if f"{prefix}{names[0]}.lora_A.weight" in weights:
                down, up = _fused(
                    [weights[f"{prefix}{n}.lora_A.weight"] for n in names],
                    [weights[f"{prefix}{n}.lora_B.weight"] for n in names],
                )
                name = "lora_unet_" + sides[side].format(block) + "_qkv"
                converted.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
                converted[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        for module, side in outputs.items():
            if f"{prefix}{module}.lora_A.weight" in weights:
                name = "lora_unet_" + sides[side].format(block) + "_proj"
                down = weights[f"{prefix}{module}.lora_A.weight"]
                converted[f"{name}.lora_down.weight"] = down
                converted[f"{name}.lora_up.weight"] = weights[f"{prefix}{module}.lora_B.weight"]
                converted[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    assert len(converted) > 8
    save_file(converted, kohya_file)


@pytest.mark.parametrize(("family", "preset"), [("sd3", "tiny-sd3"), ("flux-dev", "tiny-flux-dev")])
def test_kohya_files_make_the_same_image_as_the_diffusers_file(tmp_path, family, preset, record_property):
    import shutil

    written = write_synthetic_adapter(adapters_for(preset)[0], tmp_path / "written")
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(written, folder / "sketch.safetensors")
    _as_kohya(written, folder / "kohya-sketch.safetensors", "sd3" if family == "sd3" else "flux")
    model = load(preset, directory=str(folder))
    base, sketched, kohya = model.generate([job(1), job(1, ("sketch", 1.0)), job(1, ("kohya-sketch", 1.0))])
    assert np.abs(pixels(sketched) - pixels(base)).max() > 2
    diff = int(np.abs(pixels(kohya) - pixels(sketched)).max())
    record_property(f"max_diff_kohya_vs_diffusers[{family}]", diff)
    assert diff <= 1


def test_an_adapter_for_another_architecture_is_refused_not_silently_ignored(models, tmp_path):
    """diffusers loads a LoRA whose keys fit no module of the model without a word; here it is an error."""
    from serve_app.pipeline.adapters import AdapterCatalog

    sd3 = models["sd3"]
    written = write_synthetic_adapter(SyntheticAdapter(name="unet-ink", preset="tiny"), tmp_path)
    written.rename(tmp_path / "unet-ink.safetensors")
    sd3.adapters.catalog = AdapterCatalog(str(tmp_path), adapters_for("tiny-sd3"))
    try:
        [result] = sd3.generate([job(1, ("unet-ink", 1.0))])
    finally:
        sd3.adapters.catalog = AdapterCatalog(None, adapters_for("tiny-sd3"))
    assert isinstance(result, InvalidTaskError) and result.field == "loras"
    assert "none of its weights fit" in result.message
