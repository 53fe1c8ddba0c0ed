"""Big-model memory options for SD3 / FLUX.1 (PipelineOptions): what runs on CPU, and the clear refusals where an
option cannot apply (a ValueError naming the option, raised when the model loads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_through_loop

from serve_app.pipeline.loading import ModelSource, PipelineOptions, load_pipeline
from serve_app.pipeline.model import LoadedModel
from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageResult, ImageTask, to_uint8


def options(**values) -> PipelineOptions:
    return PipelineOptions(device="cpu", torch_threads=1, **values)


def pixels(result) -> np.ndarray:
    assert isinstance(result, ImageResult), result
    return result.pixels.astype(int)


def test_sd3_without_t5_reads_prompts_through_clip_and_still_steps_exactly(record_property):
    model = LoadedModel.load("synthetic:tiny-sd3", options(drop_t5=True))
    assert model.pipe.text_encoder_3 is None and model.pipe.tokenizer_3 is None
    assert model.max_prompt_tokens == 77  # CLIP's: T5's share of the embedding is zeros
    tasks = [ImageTask(ImageParams(prompt=f"a lighthouse {i}", seed=i, num_inference_steps=3)) for i in range(2)]
    whole = model.generate(tasks)
    with torch.inference_mode():
        reference = model.pipe(
            prompt=[t.params.prompt for t in tasks],
            num_inference_steps=3,
            guidance_scale=model.defaults.guidance_scale,
            width=64,
            height=64,
            max_sequence_length=model.max_sequence_length,
            generator=[torch.Generator().manual_seed(t.seed) for t in tasks],
            output_type="np",
        ).images
    assert all(np.array_equal(pixels(r), ref) for r, ref in zip(whole, to_uint8(reference).astype(int)))
    stepped, _ = run_through_loop(model, "step", tasks)
    diff = max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(whole, stepped))
    record_property("max_diff_sd3_without_t5_step_vs_request", diff)
    assert diff <= 1
    # The other modules are the same weights as with T5: only the text embedding changed.
    with_t5 = load_pipeline(ModelSource.parse("synthetic:tiny-sd3"), options())
    assert torch.equal(next(with_t5.transformer.parameters()), next(model.pipe.transformer.parameters()))


@pytest.mark.parametrize("preset", ["tiny-flux-schnell", "tiny"])
def test_dropping_t5_is_refused_where_t5_is_not_optional(preset):
    with pytest.raises(ValueError, match="drop_t5 applies to Stable Diffusion 3"):
        load_pipeline(ModelSource.parse(f"synthetic:{preset}"), options(drop_t5=True))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cpu_offload_needs_a_gpu(mode):
    with pytest.raises(ValueError, match=f"cpu_offload '{mode}'.*CUDA device"):
        load_pipeline(ModelSource.parse("synthetic:tiny-flux-schnell"), options(cpu_offload=mode))


def test_max_sequence_length_is_a_per_model_option_for_t5_models_only():
    model = LoadedModel.load("synthetic:tiny-flux-schnell", options(max_sequence_length=32))
    assert model.max_sequence_length == model.describe()["max_sequence_length"] == 32
    [state] = model_stepper(model).start([model.prepare(ImageTask(ImageParams(prompt="x", seed=1)))[0]])
    assert state.cond.shape[1] == 32
    with pytest.raises(ValueError, match="max_sequence_length applies to models that read prompts through T5"):
        load_pipeline(ModelSource.parse("synthetic:tiny"), options(max_sequence_length=32))
    with pytest.raises(ValueError, match="less than or equal to 512"):
        options(max_sequence_length=600)


def model_stepper(model):
    from serve_app.pipeline.steppers import make_stepper

    stepper, reason = make_stepper(model)
    assert stepper is not None, reason
    return stepper


def test_channels_last_is_refused_for_transformers():
    with pytest.raises(ValueError, match="channels_last applies to UNet models"):
        load_pipeline(ModelSource.parse("synthetic:tiny-sd3"), options(channels_last=True))


def test_vae_tiling_decodes_flow_images_in_tiles_in_both_engines(record_property):
    """Past the VAE's tile size (64 pixels for the tiny VAE) the image is decoded in overlapping tiles."""
    model = LoadedModel.load("synthetic:tiny-flux-schnell", options(vae_tiling=True))
    assert model.pipe.vae.use_tiling
    task = ImageTask(ImageParams(prompt="a wide harbour", seed=2, width=192, height=128, num_inference_steps=2))
    [whole] = model.generate([task])
    [stepped], _ = run_through_loop(model, "step", [task])
    assert whole.pixels.shape == (128, 192, 3)
    diff = int(np.abs(pixels(whole) - pixels(stepped)).max())
    record_property("max_diff_vae_tiling_step_vs_request", diff)
    assert diff == 0
