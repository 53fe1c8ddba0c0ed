"""ControlNet rows in a UNet step: one call per ControlNet over the rows that use it, residuals summed per row.

What diffusers' `StableDiffusion(XL)ControlNetPipeline` does for one request, done here for rows of many requests
that share one UNet call (`UNetStepper.predict_noise`), each with its own units:

  window    a unit acts at step i of its image's n (`len(timesteps)`) unless i/n < start or (i+1)/n > end
            (the pipelines' `controlnet_keep`); outside it the unit adds nothing and costs nothing
  rows      a unit in balanced or prompt mode acts on both rows of an image with classifier-free guidance, in
            control mode (guess mode) on its conditional row only (its unconditional row gets zeros); an image
            without guidance has one row
  calls     per tick, ONE call per ControlNet over every row it acts on (a second one for images that use the same
            ControlNet twice), in UNet row order; each at conditioning scale 1, its conditioning embedding computed
            once per unit when the image starts (it depends on the control image only), over as many rows as the
            unit acts on, as the pipelines compute it (a convolution over 2 rows rounds apart from one over 1)
  scales    per row, grouped by scale, with the scale a Python float as the pipelines apply it: balanced r * scale;
            control (diffusers' guess mode) r * (logspace(-1, 0) * scale)[level]; prompt (r * scale) *
            logspace(-1, 0)[level] (`controlnets.level_scales`)
  sum       into zero buffers for every UNet row, unit by unit in each image's order (`MultiControlNetModel`'s
            order); rows without control get zeros, which leave the UNet's sums as they are; a tick in which no
            row is controlled passes no residuals at all

An image stepped alone is bit-identical to the ControlNet pipeline's; beside others within 1/255.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..controlnets import level_scales
from .common import as_index


@dataclass
class ControlUnitRows:
    """One unit of one image, as the stepper holds it: which ControlNet, how, and its conditioning embedding."""

    name: str
    scale: float
    start: float
    end: float
    mode: str
    # (rows, C, h, w): the net's `controlnet_cond_embedding` of the control image, one row per UNet row the unit
    # acts on (unconditional, conditional) as the pipelines compute it
    embedding: torch.Tensor

    def active(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)


class _Precomputed(torch.nn.Module):
    """Stands in for a ControlNet's conditioning embedding during a call: the rows' embeddings, computed before."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embedding = embedding

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        return self.embedding


@contextlib.contextmanager
def _embedding_given(net, embedding: torch.Tensor):
    original = net.controlnet_cond_embedding
    net.controlnet_cond_embedding = _Precomputed(embedding)
    try:
        yield
    finally:
        net.controlnet_cond_embedding = original


class ControlNetRows:
    """The ControlNets of one model, applied per row of its UNet calls."""

    def __init__(self, nets: dict, vae_scale_factor: int, device):
        from diffusers.image_processor import VaeImageProcessor

        self.nets = nets
        self.device = device
        # The ControlNet pipelines' control_image_processor.
        self.processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)

    def prepare(self, task, guided: bool) -> list[ControlUnitRows]:
        """A task's units, each with its control image read as the pipelines' `prepare_image` reads it and passed
        through its ControlNet's conditioning embedding once, for both rows of a `guided` image (but in guess
        mode)."""
        from PIL import Image

        p = task.params
        units = []
        for unit, image in zip(p.controlnet, task.control_images):
            net = self.nets[unit.name]
            pixels = self.processor.preprocess(Image.fromarray(image), height=p.height, width=p.width)
            # A channels-last view: the pipelines' batched copies are contiguous (else the convolution rounds apart).
            pixels = pixels.to(dtype=torch.float32).to(device=self.device, dtype=net.dtype).contiguous()
            if guided and unit.control_mode != "control":
                pixels = torch.cat([pixels] * 2)
            if net.config.controlnet_conditioning_channel_order == "bgr":
                pixels = torch.flip(pixels, dims=[1])
            embedding = net.controlnet_cond_embedding(pixels)
            units.append(
                ControlUnitRows(unit.name, float(unit.scale), unit.start, unit.end, unit.control_mode, embedding)
            )
        return units

    def residuals(self, ordered: list, guidance, model_input: torch.Tensor, t: torch.Tensor, rows: dict):
        """(down residuals, mid residual) for every row of a UNet call, or None when no row is controlled this tick.

        `ordered`: the call's states; `guidance`: its GuidanceRows (unconditional rows of guided states first, then
        the conditional rows of all); `model_input`, `t`, `rows`: the call's inputs and conditioning rows."""
        entries = self._entries(ordered, guidance)
        if not entries:
            return None
        calls = self._calls(entries)
        outputs = [self._call(name, members, model_input, t, rows) for name, members in calls]
        total = model_input.shape[0]
        if len(calls) == 1 and _covers_in_order(calls[0][1], total):
            return outputs[0]  # one unit on every row, in row order: the residuals as the pipeline passes them
        down_shapes = [sample.shape[1:] for sample in outputs[0][0]]
        like = outputs[0][1]
        down = [torch.zeros((total, *shape), dtype=like.dtype, device=like.device) for shape in down_shapes]
        mid = torch.zeros((total, *like.shape[1:]), dtype=like.dtype, device=like.device)
        slots = max(entry[0] for entry in entries) + 1
        for slot in range(slots):  # each row's units summed in its order
            for (_, members), (samples, mid_sample) in zip(calls, outputs):
                positions = [i for i, member in enumerate(members) if member[0] == slot]
                if not positions:
                    continue
                taken = as_index(positions, self.device)
                targets = torch.tensor([members[i][1] for i in positions], device=self.device)
                for buffer, sample in zip(down, samples):
                    buffer[targets] += sample[taken]
                mid[targets] += mid_sample[taken]
        return down, mid

    @staticmethod
    def _entries(ordered: list, guidance) -> list[tuple[int, int, ControlUnitRows, int]]:
        """(unit slot, UNet row, unit, its embedding's row) for every unit acting this tick, on each row it acts on."""
        uncond_row = {position: row for row, position in enumerate(guidance.positions)}
        entries = []
        for index, state in enumerate(ordered):
            if not state.control:
                continue
            step, steps = state.step_index, state.total_steps
            for slot, unit in enumerate(state.control):
                if not unit.active(step, steps):
                    continue
                if index in uncond_row and unit.mode != "control":
                    entries.append((slot, uncond_row[index], unit, 0))
                entries.append((slot, guidance.count + index, unit, len(unit.embedding) - 1))
        return entries

    @staticmethod
    def _calls(entries: list) -> list[tuple[str, list]]:
        """Entries grouped into ControlNet calls: one per ControlNet, a further one wherever a row uses the same
        ControlNet again; members of a call in UNet row order."""
        calls: dict[tuple[str, int], list] = {}
        uses: dict[tuple[str, int], int] = {}
        for entry in entries:
            name, row = entry[2].name, entry[1]
            layer = uses.get((name, row), 0)
            uses[(name, row)] = layer + 1
            calls.setdefault((name, layer), []).append(entry)
        return [(name, sorted(members, key=lambda entry: entry[1])) for (name, _), members in calls.items()]

    def _call(self, name: str, members: list, model_input: torch.Tensor, t: torch.Tensor, rows: dict):
        """One ControlNet call over its members' rows at conditioning scale 1, then each row's scale."""
        net = self.nets[name]
        index = as_index([member[1] for member in members], self.device)
        whole = isinstance(index, slice) and index == slice(0, model_input.shape[0])
        pick = (lambda x: x) if whole else (lambda x: x[index])
        embedding = _embeddings(members)
        added = rows["added_cond_kwargs"]
        with _embedding_given(net, embedding):
            down, mid = net(
                pick(model_input),
                pick(t),
                encoder_hidden_states=pick(rows["encoder_hidden_states"]),
                controlnet_cond=embedding,
                conditioning_scale=1.0,
                added_cond_kwargs=None if added is None else {key: pick(value) for key, value in added.items()},
                return_dict=False,
            )
        return _scaled(list(down), mid, [member[2] for member in members], self.device)


def _scaled(down: list, mid: torch.Tensor, units: list[ControlUnitRows], device) -> tuple[list, torch.Tensor]:
    """Each row's residuals times its unit's scale, by mode, as the pipelines compute them (Python float scales)."""
    groups: dict[tuple[float, str], list[int]] = {}
    for row, unit in enumerate(units):
        groups.setdefault((unit.scale, unit.mode), []).append(row)
    levels = len(down) + 1

    def apply(samples: list, middle: torch.Tensor, scale: float, mode: str):
        if mode == "balanced":
            return [s * scale for s in samples], middle * scale
        scales = level_scales(levels, middle.device)
        if mode == "control":  # diffusers' guess mode: logspace times the conditioning scale, then per level
            scales = scales * scale
            return [s * f for s, f in zip(samples, scales)], middle * scales[-1]
        samples, middle = [s * scale for s in samples], middle * scale
        return [s * f for s, f in zip(samples, scales)], middle * scales[-1]

    if len(groups) == 1:
        (scale, mode), _ = next(iter(groups.items()))
        return apply(down, mid, scale, mode)
    out_down = [torch.empty_like(s) for s in down]
    out_mid = torch.empty_like(mid)
    for (scale, mode), members in groups.items():
        index = as_index(members, device)
        samples, middle = apply([s[index] for s in down], mid[index], scale, mode)
        for target, sample in zip(out_down, samples):
            target[index] = sample
        out_mid[index] = middle
    return out_down, out_mid


def _embeddings(members: list) -> torch.Tensor:
    """The conditioning embeddings of a call's rows: a unit's own (all its rows) when the call is that unit alone."""
    first = members[0][2]
    if all(member[2] is first for member in members) and len(members) == len(first.embedding):
        return first.embedding
    return torch.cat([member[2].embedding[member[3] : member[3] + 1] for member in members])


def _covers_in_order(members: list, total: int) -> bool:
    """Whether one call's members are every row of the UNet call, in order (each row then has this one unit)."""
    return len(members) == total and all(member[1] == row for row, member in enumerate(members))
