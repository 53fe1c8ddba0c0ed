"""Turn a model source and options into a ready diffusers pipeline.

A model source is one string, used everywhere (config, CLI, tests):
  * `synthetic:<preset>`      real architecture, random weights (see synthetic.py)
  * `hf:<owner/name>` or `<owner/name>`   a Hugging Face Hub repo, via from_pretrained
  * a path to a local diffusers directory (absolute, ./relative or ~)
Nothing falls back silently from a real model to random weights.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["synthetic", "hub", "local"]
    location: str  # preset name, repo id or directory

    @classmethod
    def parse(cls, text: str) -> ModelSource:
        text = text.strip()
        if text.startswith("synthetic:"):
            from .synthetic import preset_names

            preset = text.removeprefix("synthetic:")
            if preset not in preset_names():
                raise ModelSourceError(
                    f"unknown synthetic preset {preset!r} in model {text!r}; "
                    f"choose one of: {', '.join('synthetic:' + p for p in preset_names())}"
                )
            return cls("synthetic", preset)
        if text.startswith("hf:"):
            return cls("hub", text.removeprefix("hf:"))
        if text.startswith(("/", "./", "../", "~")) or Path(text).is_dir():
            path = Path(text).expanduser()
            if not path.is_dir():
                raise ModelSourceError(f"model directory {text!r} does not exist")
            if not (path / "model_index.json").is_file():
                raise ModelSourceError(f"model directory {text!r} has no model_index.json: not a diffusers pipeline")
            return cls("local", str(path.resolve()))
        if _HUB_ID.match(text):
            return cls("hub", text)
        raise ModelSourceError(
            f"cannot read model source {text!r}: use 'synthetic:<preset>', a Hugging Face repo id "
            "('owner/name' or 'hf:owner/name') or a path to a diffusers directory"
        )

    def __str__(self) -> str:
        return {"synthetic": "synthetic:", "hub": "hf:", "local": ""}[self.kind] + self.location


class PipelineOptions(BaseModel):
    """How to load and run the pipeline on a replica."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on cuda, float32 elsewhere"
    )
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa", description="attention kernels: PyTorch scaled_dot_product_attention, or xformers (GPU, optional extra)"
    )
    torch_threads: int | None = Field(None, ge=1, description="intra-op CPU threads; default: torch's choice")
    cache_dir: str | None = Field(None, description="Hugging Face cache directory for hub models")
    local_files_only: bool = Field(False, description="never reach the Hub; load only what is cached")
    variant: str | None = Field(None, description="weights variant to load from the Hub, e.g. fp16")
    channels_last: bool = Field(
        False, description="UNet in channels-last memory format (faster convs on some GPUs); UNet models only"
    )
    compile: bool = Field(
        False, description="torch.compile the denoiser (UNet or transformer; GPU; first calls per batch size are slow)"
    )
    vae_slicing: bool = Field(False, description="decode a batch one image at a time (less peak memory)")
    vae_tiling: bool = Field(False, description="decode large images in tiles (less peak memory)")
    max_sequence_length: int | None = Field(
        None,
        ge=1,
        le=512,
        description="T5 tokens every prompt is read as, for models that read prompts through T5 (SD3, FLUX.1). One "
        "per model: images in one transformer call share one text length (the pipelines pass no attention mask, "
        "so padding to a common length would change images), and text tokens cost as much as image tokens. "
        "Unset: the synthetic preset's, else the pipeline's own (SD3 256, FLUX.1 [dev] 512, [schnell] 256)",
    )
    drop_t5: bool = Field(
        False,
        description="SD3 only: load without the T5-XXL text encoder (4.7B parameters, 9.5 GB in float16); prompts "
        "are then read by the two CLIP encoders alone (T5's share of the text embedding is zeros: some prompt "
        "adherence lost). FLUX.1 cannot: T5 is its main text conditioning",
    )
    cpu_offload: Literal["none", "model", "sequential"] = Field(
        "none",
        description="keep weights in CPU memory, moving them to the GPU when used (accelerate; CUDA devices only). "
        "model: one whole module at a time (text encoders, denoiser, VAE; each switch costs a transfer), "
        "sequential: layer by layer (least GPU memory, many times slower)",
    )
    seed: int = Field(0, description="weight seed for synthetic models")
    controlnet_batching: Literal["mixed", "grouped"] = Field(
        "mixed",
        description="step engine: mixed: images with different ControlNets, scales and windows (and images with none) "
        "share one UNet call; grouped: only images with the same ControlNet units do",
    )
    engine: Literal["step", "request"] = Field(
        "step",
        description="step: images join and leave the running batch at every denoising step (continuous batching); "
        "request: whole pipeline calls. Pipelines the step engine does not know run request-level.",
    )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_pipeline(source: ModelSource, options: PipelineOptions):
    """Load, place and optimise the text-to-image pipeline named by `source`. Options that cannot apply to
    this model or machine are a ValueError naming the option."""
    import torch

    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.attention == "xformers":
        _check_xformers(device)
    if options.cpu_offload != "none":
        _check_cpu_offload(options, device)
    if options.drop_t5:
        _check_drop_t5(_pipeline_class_name(source, options))

    # Offloaded weights are loaded into CPU memory; accelerate's hooks move them to the device when used.
    load_device = "cpu" if options.cpu_offload != "none" else device
    if source.kind == "synthetic":
        from .synthetic import build_pipeline

        pipe = build_pipeline(
            source.location, seed=options.seed, device=load_device, dtype=dtype, without_t5=options.drop_t5
        )
    else:
        pipe = _from_pretrained(source, options, dtype)
    _check_options_fit(pipe, options)
    if options.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    _apply_optimisations(pipe, options)
    return pipe


def _from_pretrained(source: ModelSource, options: PipelineOptions, dtype):
    from diffusers import AutoPipelineForText2Image

    kwargs = {"dtype": dtype, "cache_dir": options.cache_dir, "local_files_only": options.local_files_only}
    if options.variant:
        kwargs["variant"] = options.variant
    if options.drop_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)  # never read from disk
    try:
        return AutoPipelineForText2Image.from_pretrained(source.location, **kwargs)
    except OSError as exc:
        hint = " (offline: is it in the cache? set cache_dir)" if options.local_files_only else ""
        raise ModelSourceError(f"cannot load model {source}{hint}: {exc}") from exc


def _pipeline_class_name(source: ModelSource, options: PipelineOptions) -> str:
    """The pipeline class a model source holds, read from its preset or model_index.json (no weights loaded)."""
    if source.kind == "synthetic":
        from .synthetic import load_preset

        return load_preset(source.location)["pipeline"]
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(
            source.location, cache_dir=options.cache_dir, local_files_only=options.local_files_only
        )
    except OSError as exc:
        raise ModelSourceError(f"cannot load model {source}: {exc}") from exc
    return config["_class_name"]


def _check_drop_t5(pipeline_class: str) -> None:
    if pipeline_class != "StableDiffusion3Pipeline":
        raise ValueError(
            f"drop_t5 applies to Stable Diffusion 3 models, whose T5 encoder is optional; this model is a "
            f"{pipeline_class}" + (" (FLUX.1 reads prompts mainly through T5)" if "Flux" in pipeline_class else "")
        )


def _check_cpu_offload(options: PipelineOptions, device: str) -> None:
    if not device.startswith("cuda"):
        raise ValueError(
            f"cpu_offload {options.cpu_offload!r} moves weights between CPU memory and a GPU: it needs a CUDA "
            f"device, not {device!r}; set cpu_offload: none"
        )
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError(f"cpu_offload {options.cpu_offload!r} needs accelerate: pip install accelerate")
    if options.compile:
        raise ValueError("cpu_offload and compile do not mix (offload hooks move weights under the compiled graph)")


def _check_options_fit(pipe, options: PipelineOptions) -> None:
    """Options that depend on what the model is (known once its class is)."""
    from .families import family_of

    family = family_of(pipe)
    if options.max_sequence_length is not None and not family.reads_t5:
        raise ValueError(
            f"max_sequence_length applies to models that read prompts through T5 (SD3, FLUX.1); "
            f"{type(pipe).__name__} reads them through CLIP ({family.name} family): leave it unset"
        )
    if options.channels_last and getattr(pipe, "unet", None) is None:
        raise ValueError(
            f"channels_last applies to UNet models (convolutions); {type(pipe).__name__} has a transformer: "
            "leave it unset"
        )


def _check_xformers(device: str) -> None:
    if not device.startswith("cuda"):
        raise ValueError(f"attention 'xformers' needs a CUDA device, not {device!r}; use attention: sdpa")
    if importlib.util.find_spec("xformers") is None:
        raise ValueError("attention 'xformers' requested but xformers is not installed: pip install '.[gpu]'")


def _apply_optimisations(pipe, options: PipelineOptions) -> None:
    import torch

    if options.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.compile:
        name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        setattr(pipe, name, torch.compile(getattr(pipe, name), mode="max-autotune-no-cudagraphs"))


def image_to_image(pipe):
    """The image-to-image pipeline over `pipe`'s modules: no weights copied, no progress bars."""
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def inpainting(pipe):
    """The inpaint pipeline over `pipe`'s modules (its own, if `pipe` already is one): no weights copied."""
    from diffusers import AutoPipelineForInpainting

    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def reads_mask(pipe) -> bool:
    """Whether the denoiser is an inpainting model's: its input is the latents, the mask and the masked image's
    latents concatenated (a 9-channel UNet), not the latents alone."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return False
    latent = pipe.vae.config.latent_channels
    return unet.config.in_channels == 2 * latent + 1


def load_refiner(source: ModelSource, options: PipelineOptions, base):
    """The image-to-image pipeline of a refiner (SDXL's), sharing the base pipeline's second text encoder
    and VAE where the architectures match (the refiner's own are never loaded then)."""
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    shared = _shareable_with_refiner(base)
    if source.kind == "synthetic":
        from .synthetic import build_pipeline

        refiner = build_pipeline(source.location, seed=options.seed, device=device, dtype=dtype)
        if shared and _shares_fit(refiner, base):
            flags = {k: refiner.config[k] for k in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")}
            refiner = type(refiner)(**{**refiner.components, **shared}, **flags)
    else:
        from diffusers import AutoPipelineForImage2Image

        kwargs = {"dtype": dtype, "cache_dir": options.cache_dir, "local_files_only": options.local_files_only}
        if options.variant:
            kwargs["variant"] = options.variant
        try:
            refiner = AutoPipelineForImage2Image.from_pretrained(source.location, **kwargs, **shared)
        except OSError as exc:
            raise ModelSourceError(f"cannot load refiner {source}: {exc}") from exc
    refiner = refiner.to(device)
    refiner.set_progress_bar_config(disable=True)
    _apply_optimisations(refiner, options)
    return refiner


def _shareable_with_refiner(base) -> dict:
    """SDXL's refiner reads only the base's second text encoder (and its tokenizer) and the same VAE."""
    if getattr(base, "text_encoder_2", None) is None:
        return {}
    return {"text_encoder_2": base.text_encoder_2, "tokenizer_2": base.tokenizer_2, "vae": base.vae}


def _shares_fit(refiner, base) -> bool:
    return (
        getattr(refiner, "text_encoder_2", None) is not None
        and refiner.unet.config.cross_attention_dim == base.text_encoder_2.config.hidden_size
        and refiner.vae.config.latent_channels == base.vae.config.latent_channels
    )
