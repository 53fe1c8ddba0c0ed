"""LoRA adapters: where they come from (`AdapterCatalog`) and how they apply per image (`LoraMixer`).

An adapter is a `.safetensors` file that diffusers' `load_lora_weights` reads (diffusers/PEFT or
kohya format; kohya files for SD3, which diffusers 0.42 cannot read, are converted here:
`kohya_sd3_to_diffusers`), named by its file stem, from a configured directory; or, for tests and the offline demo, a synthetic adapter: random
low-rank weights for a synthetic model (its UNet, or its transformer's attention), written once as a
real adapter file and loaded like any other.

`LoraMixer` loads adapters into one pipeline once (least recently used out past a cap) and
applies them **per row of a model call**: every adapter any row needs is active, and a forward
hook on each adapter's down-projection (`lora_A`) multiplies its output by that row's scale for
that adapter (0 where the row does not use it). LoRA's up-projection is linear without bias, so
this is exactly the adapter at that scale for that row, and nothing for the others: images with
different adapter sets and scales share one UNet call, and a row without adapters gets the base
model's output unchanged. The same holds for SD3 and FLUX.1 transformers: every LoRA linear in them
sees batch-first tensors (rows, tokens, features).

Torch-free at import: the ingress lists the catalog on CPU-only nodes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidTaskError
from .params import AdapterName

logger = logging.getLogger(__name__)

AdapterKey = tuple[tuple[str, float], ...]  # ImageParams.adapter_key: (name, scale) pairs, sorted


class SyntheticAdapter(BaseModel):
    """Random low-rank weights for a synthetic model's denoiser (UNet, or SD3 / FLUX.1 transformer), written as a
    real adapter file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AdapterName
    preset: str = Field("tiny", description="the synthetic preset (architecture) the adapter fits")
    rank: int = Field(4, ge=1, le=128)
    seed: int = Field(0, ge=0, description="weights drawn from this seed: the same adapter in every process")


class AdapterSettings(BaseModel):
    """`args.loras` of a Serve config: where adapters come from and how they batch."""

    model_config = ConfigDict(extra="forbid")

    directory: str | None = Field(
        None, description="*.safetensors LoRA files (diffusers/PEFT or kohya), named by file stem; every node reads it"
    )
    synthetic: list[SyntheticAdapter] = Field(default_factory=list, description="random adapters for synthetic models")
    max_loaded: int = Field(
        16, ge=1, description="adapters kept loaded per model on a replica (least recently used out)"
    )
    batching: Literal["mixed", "grouped"] = Field(
        "mixed",
        description="mixed: images with different adapters and scales share one UNet call; "
        "grouped: only images with the same adapters and scales do",
    )

    def catalog(self) -> AdapterCatalog:
        return AdapterCatalog(self.directory, self.synthetic)


class AdapterCatalog:
    """The adapters a deployment offers: `*.safetensors` in `directory` (name = file stem) and synthetic ones."""

    # Every request's adapter names are checked against the listing: a directory of thousands of files is
    # listed at most this often, and a file added to it is offered within this long, without a restart.
    LISTING_TTL_S = 5.0

    def __init__(self, directory: str | None = None, synthetic: list[SyntheticAdapter] | tuple = ()):
        self.directory = Path(directory).expanduser() if directory else None
        self.synthetic = {adapter.name: adapter for adapter in synthetic}
        self._listing: tuple[float, dict[str, Path]] | None = None

    def _files(self) -> dict[str, Path]:
        if self.directory is None:
            return {}
        now = time.monotonic()
        if self._listing is None or now - self._listing[0] > self.LISTING_TTL_S:
            found = sorted(self.directory.glob("*.safetensors")) if self.directory.is_dir() else []
            self._listing = (now, {path.stem: path for path in found})
        return self._listing[1]

    def names(self) -> list[str]:
        return sorted({*self._files(), *self.synthetic})

    def describe(self) -> list[dict]:
        files = self._files()
        listed = [{"name": name, "source": "file", "path": str(path)} for name, path in files.items()]
        listed += [
            {"name": a.name, "source": "synthetic", "preset": a.preset, "rank": a.rank, "seed": a.seed}
            for a in self.synthetic.values()
            if a.name not in files
        ]
        return sorted(listed, key=lambda entry: entry["name"])

    def path(self, name: str) -> Path:
        """The adapter's file, written first for a synthetic adapter. A file in the directory wins."""
        found = self._files().get(name)
        if found is not None:
            return found
        if name in self.synthetic:
            return write_synthetic_adapter(self.synthetic[name])
        raise InvalidTaskError(
            f"unknown LoRA adapter {name!r}; available: {', '.join(self.names()) or 'none'}", "loras"
        )


def write_synthetic_adapter(adapter: SyntheticAdapter, directory: str | Path | None = None) -> Path:
    """Write (once; later calls find the file) the adapter as diffusers' LoRA format and return its path."""
    folder = Path(directory) if directory else Path(tempfile.gettempdir()) / "sd-serve-adapters"
    path = folder / f"{adapter.name}-{adapter.preset}-r{adapter.rank}-s{adapter.seed}.safetensors"
    if path.is_file():
        return path
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from .synthetic import build_denoiser, load_preset

    spec = load_preset(adapter.preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter.seed)
        name, denoiser = build_denoiser(spec)
        denoiser.add_adapter(
            LoraConfig(
                r=adapter.rank,
                lora_alpha=adapter.rank,
                target_modules=_SYNTHETIC_TARGETS[name],
                init_lora_weights=False,  # random down AND up projections: the adapter changes images
            )
        )
    layers = get_peft_model_state_dict(denoiser)
    folder.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed: replicas that write the same adapter at once never read half a file.
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        getattr(diffusers, spec["pipeline"]).save_lora_weights(
            scratch, **{f"{name}_lora_layers": layers}, weight_name="a.safetensors"
        )
        os.replace(Path(scratch) / "a.safetensors", path)
    return path


# What a synthetic adapter adapts: a UNet's attention projections; a transformer's joint attention in its
# (double-stream) transformer blocks, image and text sides, as LoRA trainers commonly target them (FLUX.1's
# single-stream blocks are left out: kohya fuses their projections with the MLP's, at full-size widths).
_SYNTHETIC_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "transformer": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
}


class LoraMixer:
    """The adapters loaded into one pipeline, applied per row. Call from the engine's thread only."""

    def __init__(self, pipe, catalog: AdapterCatalog, max_loaded: int = 16):
        self.pipe = pipe
        self.catalog = catalog
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, float] = OrderedDict()  # name -> seconds its load took; LRU first
        self.loads = 0
        self.evictions = 0
        self._active: tuple[str, ...] = ()  # adapters active on the pipeline's LoRA layers
        self._scales: dict[str, object] = {}  # adapter -> per-row scale tensor during a call
        self._row_tasks = None  # which task each row of the next calls belongs to (None: rows are tasks, repeated)
        self._shaped: dict[tuple, object] = {}  # (adapter, rows, dims) -> its scales as that layer multiplies them
        self._device = None  # the denoiser's (asking the pipeline walks every module)
        self._hooked: weakref.WeakSet = weakref.WeakSet()

    def describe(self) -> dict:
        return {"loaded": list(self.loaded), "loads": self.loads, "evictions": self.evictions}

    def load(self, names: list[str] | set[str]) -> None:
        """Make sure these adapters are loaded (InvalidTaskError, field `loras`, if one is unknown or does
        not fit this model). Past the cap, the least recently used adapters not named here go."""
        for name in sorted(names):
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            path = self.catalog.path(name)
            while len(self.loaded) >= self.max_loaded:
                victim = next((n for n in self.loaded if n not in names), None)
                if victim is None:
                    break  # every loaded adapter is wanted right now: go above the cap for this call
                self._unload(victim)
            started = time.perf_counter()
            try:
                # Inference mode throughout: adapter weights made in it can only be switched in it.
                with _inference_mode():
                    self.pipe.load_lora_weights(self._readable(path), adapter_name=name)
                if not self._registered(name):
                    raise ValueError(
                        "none of its weights fit this model's modules (a LoRA for another architecture, or a format "
                        "diffusers does not read for this model)"
                    )
            except Exception as exc:  # noqa: BLE001 - any failure means this adapter cannot serve here
                self._forget(name)
                raise InvalidTaskError(
                    f"LoRA adapter {name!r} cannot be applied to this model: {exc}", "loras"
                ) from exc
            self.loaded[name] = time.perf_counter() - started
            self.loads += 1
            self._active = None  # loading changes which adapters the layers hold active
            self._hook_new_layers()
            logger.info("loaded LoRA adapter %s in %.2fs", name, self.loaded[name])

    def _readable(self, path: Path):
        """What load_lora_weights is given: the file, or for SD3 a kohya file converted to diffusers' keys."""
        if type(self.pipe).__name__ != "StableDiffusion3Pipeline":
            return str(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            if not any(key.startswith("lora_unet_") for key in file.keys()):
                return str(path)
        from safetensors.torch import load_file

        return kohya_sd3_to_diffusers(load_file(str(path)), self.pipe.transformer.config.num_layers)

    def _registered(self, name: str) -> bool:
        """Whether any module took the adapter: diffusers loads a file whose keys fit nothing without a word."""
        return any(name in adapters for adapters in self.pipe.get_list_adapters().values())

    def _unload(self, name: str) -> None:
        self.loaded.pop(name, None)
        self._forget(name)
        self.evictions += 1
        self._active = None

    def _forget(self, name: str) -> None:
        try:
            with _inference_mode():
                self.pipe.delete_adapters(name)
        except Exception:  # noqa: BLE001 - a half-loaded adapter may not be registered at all
            logger.debug("deleting adapter %s failed", name, exc_info=True)

    def _hook_new_layers(self) -> None:
        from peft.tuners.lora import LoraLayer

        for component in self._components():
            for module in component.modules():
                if not isinstance(module, LoraLayer):
                    continue
                for name, down in module.lora_A.items():
                    if down not in self._hooked:
                        down.register_forward_hook(partial(self._scale_rows, name))
                        self._hooked.add(down)

    def _components(self) -> list:
        names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [c for c in (getattr(self.pipe, n, None) for n in names) if c is not None]

    def _scale_rows(self, name: str, module, inputs, output):
        # Every LoRA layer of a call sees the same rows: shape each adapter's scales once per call.
        key = (name, output.shape[0], output.dim(), output.dtype)
        shaped = self._shaped.get(key)
        if shaped is None:
            shaped = self._shaped[key] = self._shape_scales(name, output)
        return output * shaped

    def _shape_scales(self, name: str, output):
        scales = self._scales.get(name)
        if scales is None:
            return output.new_zeros(())  # an adapter no row of this call asked for adds nothing
        rows = output.shape[0]
        if self._row_tasks is not None and len(self._row_tasks) == rows:
            scales = scales[self._row_tasks]
        elif rows != len(scales):
            if rows % len(scales):
                raise RuntimeError(f"a LoRA layer saw {rows} rows for {len(scales)} images")
            scales = scales.repeat(rows // len(scales))  # guidance: unconditional rows, then conditional
        return scales.view(-1, *([1] * (output.dim() - 1))).to(output.dtype)

    @contextmanager
    def applied(self, per_task: list[AdapterKey], row_tasks: list[int] | None = None) -> Iterator[None]:
        """Model calls inside run task i's adapters at its scales on task i's rows. `row_tasks`: the task of
        each row when rows are not the tasks (or the tasks repeated, as classifier-free guidance lays them)."""
        import torch

        wanted = sorted({name for key in per_task for name, _ in key})
        if not wanted:
            if self._active != ():
                if self.loaded:
                    with _inference_mode():
                        self.pipe.disable_lora()
                self._active = ()
            yield
            return
        self.load(wanted)
        if not self._active or not set(wanted) <= set(self._active):
            # Switching adapters walks every layer (milliseconds): widen the active set, never narrow it
            # while the adapters stay loaded; rows that do not use an active adapter get scale 0.
            active = sorted(set(wanted) | (set(self._active or ()) & set(self.loaded)))
            with _inference_mode():
                self.pipe.enable_lora()
                self.pipe.set_adapters(active, [1.0] * len(active))  # the scale comes per row, from the hooks
            self._active = tuple(active)
        if self._device is None:
            self._device = self._components()[0].device  # the denoiser's
        device = self._device
        self._scales = {
            name: torch.tensor([dict(key).get(name, 0.0) for key in per_task], dtype=torch.float32, device=device)
            for name in self._active
        }
        self._row_tasks = None if row_tasks is None else torch.tensor(row_tasks, device=device)
        try:
            yield
        finally:
            self._scales, self._row_tasks, self._shaped = {}, None, {}


def _inference_mode():
    import torch

    return torch.inference_mode()


# kohya (sd-scripts) names SD3 LoRA modules after the original MMDiT: per joint block, an image side (`x_block`)
# and a text side (`context_block`), each with a fused qkv projection. Their diffusers modules:
_KOHYA_SD3_MODULES = {
    ("x", "attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x", "attn_proj"): ("attn.to_out.0",),
    ("x", "attn2_qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5 Medium's dual attention
    ("x", "attn2_proj"): ("attn2.to_out.0",),
    ("x", "mlp_fc1"): ("ff.net.0.proj",),
    ("x", "mlp_fc2"): ("ff.net.2",),
    ("x", "adaLN_modulation_1"): ("norm1.linear",),
    ("context", "attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("context", "attn_proj"): ("attn.to_add_out",),
    ("context", "mlp_fc1"): ("ff_context.net.0.proj",),
    ("context", "mlp_fc2"): ("ff_context.net.2",),
    ("context", "adaLN_modulation_1"): ("norm1_context.linear",),
}


def kohya_sd3_to_diffusers(state_dict: dict, num_layers: int) -> dict:
    """An SD3 LoRA in kohya's naming (`lora_unet_joint_blocks_<i>_<x|context>_block_<module>.lora_down/lora_up`,
    `.alpha`) as diffusers' (`transformer.transformer_blocks.<i>.<module>.lora_A/lora_B`), exactly: each
    alpha / rank folded into the down projection, a fused qkv's down projection shared by q, k and v and its up
    projection split in three. A key it does not know is a ValueError (never an adapter silently half applied)."""
    import re

    import torch

    pattern = re.compile(
        r"lora_unet_joint_blocks_(\d+)_(x|context)_block_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$"
    )
    modules: dict[tuple[int, str, str], dict] = {}
    unknown = []
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match is None or (match.group(2), match.group(3)) not in _KOHYA_SD3_MODULES:
            unknown.append(key)
            continue
        modules.setdefault((int(match.group(1)), match.group(2), match.group(3)), {})[match.group(4)] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:3]) + (" ..." if len(unknown) > 3 else "")
        raise ValueError(f"{len(unknown)} kohya keys this server cannot map to SD3 modules: {shown}")
    converted = {}
    for (block, side, module), weights in modules.items():
        down, up = weights["lora_down.weight"], weights["lora_up.weight"]
        rank = down.shape[0]
        alpha = float(weights["alpha"]) if "alpha" in weights else float(rank)
        down = down * (alpha / rank)
        if side == "context" and module == "adaLN_modulation_1" and block == num_layers - 1:
            # The last block's text side keeps (shift, scale) where diffusers' continuous norm has (scale, shift).
            shift, scale = up.chunk(2, dim=0)
            up = torch.cat([scale, shift])
        targets = _KOHYA_SD3_MODULES[(side, module)]
        for target, part in zip(targets, up.chunk(len(targets), dim=0)):
            prefix = f"transformer.transformer_blocks.{block}.{target}"
            converted[f"{prefix}.lora_A.weight"] = down.contiguous()
            converted[f"{prefix}.lora_B.weight"] = part.contiguous()
    return converted
