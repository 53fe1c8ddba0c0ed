"""Following work that reports progress: pass on the latest update, then the outcome.

A consumer that reads slower than progress arrives must never fall behind: when several updates
wait, only the latest is passed on (with the latest preview among them). The Generator streams an
image's steps this way, and the generation service a request's images.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any


async def latest_then_outcome(
    outcome: asyncio.Future, updates: asyncio.Queue, merge: Callable[[Any, Any], Any] | None = None
) -> AsyncIterator[Any]:
    """Every update from `updates` while `outcome` runs (the latest of those waiting; `merge(older, newer)`
    combines them when given), then the outcome's result (its exception is raised). Leaving early
    cancels `outcome`."""
    try:
        while not outcome.done():
            waiting = asyncio.ensure_future(updates.get())
            await asyncio.wait([outcome, waiting], return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                continue
            yield _latest(waiting.result(), updates, merge)
        if not updates.empty():  # what came with the outcome: the last progress (and preview) first
            yield _latest(updates.get_nowait(), updates, merge)
        yield outcome.result()
    finally:
        outcome.cancel()


def _latest(first: Any, updates: asyncio.Queue, merge: Callable[[Any, Any], Any] | None) -> Any:
    """`first` and every update waiting after it, merged (the latest when there is no `merge`)."""
    latest = first
    while not updates.empty():
        newer = updates.get_nowait()
        latest = newer if merge is None else merge(latest, newer)
    return latest
