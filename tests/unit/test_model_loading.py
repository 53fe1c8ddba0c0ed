"""A Generator replica loading a model that does not fit in its memory: a clear 507 naming the model and
the models beside it, raised to the request that asked, instead of a crash (and a restart loop)."""

from __future__ import annotations

import pytest

from serve_app.config import AppArgs
from serve_app.generator import ModelRuntime
from serve_app.pipeline.adapters import AdapterSettings
from serve_app.pipeline.engines import EngineLimits
from serve_app.pipeline.errors import InsufficientMemoryError


def _served():
    return AppArgs.model_validate({"models": [{"id": "big", "model": "synthetic:tiny"}]}).served_models()[0]


def _load_failing_with(monkeypatch, failure):
    from serve_app.pipeline import model

    def load(*args, **kwargs):
        failure()

    monkeypatch.setattr(model.LoadedModel, "load", load)
    return ModelRuntime.load(_served(), AdapterSettings(), EngineLimits(), beside=["sd15", "sd-turbo"])


def _allocate_forty_terabytes():
    import torch

    torch.empty(10**13)  # torch's CPU allocator refuses at once: RuntimeError, "can't allocate memory"


def _memory_error():
    raise MemoryError


@pytest.mark.parametrize("failure", [_allocate_forty_terabytes, _memory_error])
def test_a_model_that_does_not_fit_is_507_naming_it_and_what_it_was_beside(monkeypatch, failure):
    with pytest.raises(InsufficientMemoryError) as refused:
        _load_failing_with(monkeypatch, failure)
    assert refused.value.status == 507 and refused.value.field == "model"
    assert refused.value.message == (
        "model 'big' does not fit in this replica's memory beside sd15, sd-turbo; "
        "lower max_models_per_replica or give the Generator more memory"
    )


def test_other_load_failures_are_not_mistaken_for_memory(monkeypatch):
    def broken():
        raise ValueError("no such repository")

    with pytest.raises(ValueError, match="no such repository"):
        _load_failing_with(monkeypatch, broken)
