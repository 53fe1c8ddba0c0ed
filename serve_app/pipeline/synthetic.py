"""Synthetic models: real diffusers architectures with random weights, built offline.

No machine this project runs on can download weights, yet tests, the offline
demo and capacity planning need pipelines whose cost per image is real. A
preset (a JSON file under `presets/`) names the pipeline class and the config
of every component; weights are drawn from a fixed seed, so the same preset
gives the same model in every process. The tokenizer is a byte-level CLIP BPE
vocabulary built from the byte-to-unicode table, with no merges.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

_TOKENIZER_SIZE = 514  # 256 bytes, the same 256 as word ends, start and end of text


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


def _text_encoder(spec: dict, tokenizer):
    import transformers

    spec = dict(spec)
    model_class = getattr(transformers, spec.pop("class"))
    spec.setdefault("vocab_size", len(tokenizer))
    config = transformers.CLIPTextConfig(
        **spec,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model_class(config)


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


def build_pipeline(preset: str, *, seed: int = 0, device: str = "cpu", dtype=None):
    """A pipeline of the preset's architecture with weights drawn from `seed` (float32 unless `dtype`)."""
    import diffusers
    import torch

    spec = load_preset(preset)
    tokenizer = build_tokenizer()
    scheduler = _scheduler(diffusers, spec["scheduler"])

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        # Built on the target device: random init of a full-size UNet on CPU takes minutes.
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**spec["unet"])
        vae = diffusers.AutoencoderKL(**spec["vae"])
        encoders = [_text_encoder(s, tokenizer) for s in spec["text_encoders"]]

    components = {"unet": unet, "vae": vae, "scheduler": scheduler, "tokenizer": tokenizer, "text_encoder": encoders[0]}
    if spec["pipeline"] == "StableDiffusionXLImg2ImgPipeline" and len(encoders) == 1:
        # An SDXL refiner: the second text encoder only, conditioned on an aesthetic score.
        components.update(text_encoder=None, tokenizer=None, text_encoder_2=encoders[0], tokenizer_2=tokenizer)
        components.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    elif len(encoders) > 1:
        components.update(text_encoder_2=encoders[1], tokenizer_2=build_tokenizer())
    pipeline_class = getattr(diffusers, spec["pipeline"])
    if pipeline_class is diffusers.StableDiffusionPipeline:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    # Cast only when asked: diffusers warns about a no-op float32 cast.
    return pipe if dtype in (None, torch.float32) else pipe.to(dtype=dtype)


def save_pipeline(preset: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the preset as a diffusers directory that `DiffusionPipeline.from_pretrained` loads."""
    out = Path(out_dir)
    build_pipeline(preset, seed=seed).save_pretrained(out)
    return out
