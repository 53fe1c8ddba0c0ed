"""Running out of device memory: release torch's cached blocks, and split the work in halves before failing.

One rule for both engines (a whole pipeline call over a group; one denoiser step over a batch): a batch
that does not fit is retried as two halves, recursively; only an image that does not fit alone fails,
with a message that says what to ask for instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .errors import InsufficientMemoryError
from .params import ImageParams

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def image_does_not_fit(params: ImageParams) -> InsufficientMemoryError:
    return InsufficientMemoryError(
        f"a {params.width}x{params.height} image does not fit in device memory on this replica; ask for a smaller size"
    )


def in_halves_while_out_of_memory(
    items: Sequence[Item],
    run: Callable[[Sequence[Item]], Outcome],
    alone_too_big: Callable[[Item], Outcome],
    combine: Callable[[Outcome, Outcome], Outcome],
    device: torch.device,
) -> Outcome:
    """`run(items)`; while the device runs out of memory, `run` each half (recursively) and `combine` the two
    outcomes. An item that does not fit alone gets `alone_too_big(item)`."""
    try:
        return run(items)
    except torch.OutOfMemoryError:
        release_cached_memory(device)
        if len(items) == 1:
            return alone_too_big(items[0])
        half = len(items) // 2
        logger.warning(
            "out of memory on a batch of %d images; retrying as %d + %d", len(items), half, len(items) - half
        )
        first = in_halves_while_out_of_memory(items[:half], run, alone_too_big, combine, device)
        return combine(first, in_halves_while_out_of_memory(items[half:], run, alone_too_big, combine, device))
