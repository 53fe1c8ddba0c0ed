"""Synthetic models: real diffusers architectures with random weights, built offline.

No machine this project runs on can download weights, yet tests, the offline
demo and capacity planning need pipelines whose cost per image is real. A
preset (a JSON file under `presets/`) names the pipeline class and the config
of every component: its denoiser (`unet`, or `transformer` with its class), its
VAE, its text encoders in the pipeline's order (`text_encoder`, `text_encoder_2`,
`text_encoder_3`), its scheduler, the `defaults` a task gets, and for T5-reading
models the `max_sequence_length` it runs at. Weights are drawn from a fixed
seed, so the same preset gives the same model in every process; every module is
in eval mode (a T5 built in code is in train mode, with dropout 0.1: prompt
embeddings would change from call to call).

Tokenizers are made offline: CLIP's is a byte-level BPE vocabulary built from
the byte-to-unicode table, with no merges; T5's a Unigram vocabulary of the
printable ASCII characters, with and without the word-start mark.
"""

from __future__ import annotations

import json
import string
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

_TOKENIZER_SIZE = 514  # 256 bytes, the same 256 as word ends, start and end of text
_T5_CHARACTERS = [c for c in string.printable if not c.isspace()]
_T5_TOKENIZER_SIZE = 4 + 2 * len(_T5_CHARACTERS)  # pad, end, unknown, word start; each character bare and word-initial


def preset_names() -> list[str]:
    folder = resources.files("serve_app.pipeline") / "presets"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


@cache
def load_preset(name: str) -> dict:
    if name not in preset_names():
        raise ValueError(f"unknown synthetic preset {name!r}; choose one of {', '.join(preset_names())}")
    text = (resources.files("serve_app.pipeline") / "presets" / f"{name}.json").read_text()
    return json.loads(text)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tokenizer_files(directory: Path) -> None:
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        # transformers 5 ignores vocab_file= passed to the constructor; from_pretrained reads the files.
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    if len(tokenizer) != _TOKENIZER_SIZE:
        raise RuntimeError(f"synthetic tokenizer has {len(tokenizer)} tokens, expected {_TOKENIZER_SIZE}")
    return tokenizer


def build_t5_tokenizer():
    """A T5 tokenizer (Unigram, ids: pad 0, end 1, unknown 2) over printable ASCII; other characters are unknown."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -6.0) for c in _T5_CHARACTERS] + [("\u2581" + c, -5.0) for c in _T5_CHARACTERS]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    if len(tokenizer) != _T5_TOKENIZER_SIZE:
        raise RuntimeError(f"synthetic T5 tokenizer has {len(tokenizer)} tokens, expected {_T5_TOKENIZER_SIZE}")
    return tokenizer


def _is_t5(spec: dict) -> bool:
    return spec["class"].startswith("T5")


def _tokenizer_for(spec: dict):
    return build_t5_tokenizer() if _is_t5(spec) else build_tokenizer()


def _text_encoder(spec: dict, tokenizer):
    import transformers

    spec = dict(spec)
    model_class = getattr(transformers, spec.pop("class"))
    spec.setdefault("vocab_size", len(tokenizer))
    if model_class.__name__.startswith("T5"):
        spec.setdefault("dropout_rate", 0.0)
        config = transformers.T5Config(
            **spec, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0
        )
    else:
        config = transformers.CLIPTextConfig(
            **spec,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return model_class(config)


def build_denoiser(spec: dict):
    """The preset's UNet (`unet`) or diffusion transformer (`transformer`, with its `class`), drawn from torch's
    current random state: (its pipeline component name, the module)."""
    import diffusers

    if "unet" in spec:
        return "unet", diffusers.UNet2DConditionModel(**spec["unet"])
    config = dict(spec["transformer"])
    return "transformer", getattr(diffusers, config.pop("class"))(**config)


def _scheduler(diffusers, spec: dict):
    """The preset's scheduler with every config value stated, as it is after a save and load.

    `from_config` records the keys a config leaves out in `_use_default_values`,
    and a later `OtherScheduler.from_config(config)` takes its own defaults for
    those instead of this scheduler's (e.g. Euler's `timestep_spacing` would be
    "linspace" in memory but PNDM's "leading" once saved): the same model would
    make different images in memory and from disk. Rebuilding from the complete
    config, as `from_pretrained` does, leaves no key to a default.
    """
    spec = dict(spec)
    scheduler_class = getattr(diffusers, spec.pop("class"))
    complete = {k: v for k, v in scheduler_class.from_config(spec).config.items() if k != "_use_default_values"}
    return scheduler_class.from_config(complete)


def build_components(preset: str, *, seed: int = 0, device: str = "cpu", without_t5: bool = False) -> dict:
    """The preset's modules with weights drawn from `seed`, on `device` (float32, eval mode), with their
    tokenizers and scheduler: the keyword arguments of its pipeline class. `device="meta"` allocates nothing
    (for counting parameters of full-size presets). `without_t5`: its T5 encoder slot empty, never built
    (SD3 runs without it; every other module gets the same weights as with it)."""
    import diffusers
    import torch

    spec = load_preset(preset)
    if without_t5:
        spec = {**spec, "text_encoders": [s for s in spec["text_encoders"] if not _is_t5(s)]}
    tokenizers = [_tokenizer_for(s) for s in spec["text_encoders"]]
    scheduler = _scheduler(diffusers, spec["scheduler"])

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        # Built on the target device: random init of a full-size UNet on CPU takes minutes.
        torch.manual_seed(seed)
        denoiser_name, denoiser = build_denoiser(spec)
        vae = diffusers.AutoencoderKL(**spec["vae"])
        encoders = [_text_encoder(s, t) for s, t in zip(spec["text_encoders"], tokenizers)]
    for module in (denoiser, vae, *encoders):
        module.eval()  # modules built in code are in train mode; from_pretrained's are in eval mode

    components = {denoiser_name: denoiser, "vae": vae, "scheduler": scheduler}
    if spec["pipeline"] == "StableDiffusionXLImg2ImgPipeline" and len(encoders) == 1:
        # An SDXL refiner: the second text encoder only, conditioned on an aesthetic score.
        components.update(text_encoder=None, tokenizer=None, text_encoder_2=encoders[0], tokenizer_2=tokenizers[0])
        components.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        return components
    for index, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
        suffix = "" if index == 0 else f"_{index + 1}"
        components.update({f"text_encoder{suffix}": encoder, f"tokenizer{suffix}": tokenizer})
    if spec["pipeline"] in ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"):
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif spec["pipeline"] in ("StableDiffusion3Pipeline", "FluxPipeline"):
        components.update(image_encoder=None, feature_extractor=None)  # IP-adapter slots, empty
    if without_t5:
        components.update(text_encoder_3=None, tokenizer_3=None)
    return components


def build_pipeline(preset: str, *, seed: int = 0, device: str = "cpu", dtype=None, without_t5: bool = False):
    """A pipeline of the preset's architecture with weights drawn from `seed` (float32 unless `dtype`);
    `without_t5`: SD3 without its T5 encoder (see `build_components`)."""
    import diffusers
    import torch

    pipeline_class = getattr(diffusers, load_preset(preset)["pipeline"])
    pipe = pipeline_class(**build_components(preset, seed=seed, device=device, without_t5=without_t5))
    pipe.set_progress_bar_config(disable=True)
    # Cast only when asked: diffusers warns about a no-op float32 cast.
    return pipe if dtype in (None, torch.float32) else pipe.to(dtype=dtype)


def parameter_counts(preset: str) -> dict[str, int]:
    """Parameters of each module of the preset (built on the meta device: nothing allocated, seconds even for
    full-size presets)."""
    components = build_components(preset, device="meta")
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in components.items()
        if hasattr(module, "parameters")
    }


def save_pipeline(preset: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the preset as a diffusers directory that `DiffusionPipeline.from_pretrained` loads."""
    out = Path(out_dir)
    build_pipeline(preset, seed=seed).save_pretrained(out)
    return out
