"""`controlnets` in a Serve config's args: per model, or beside `model` for one; sources, names, families."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs
from serve_app.pipeline.controlnets import ControlNetSource


def test_each_model_gets_its_own():
    args = AppArgs.model_validate(
        {
            "models": [
                {"id": "a", "model": "synthetic:tiny", "controlnets": [{"name": "edges", "source": "synthetic:3"}]},
                {"id": "b", "model": "synthetic:tiny-xl"},
            ]
        }
    )
    served = {model.id: [entry.name for entry in model.controlnets] for model in args.served_models()}
    assert served == {"a": ["edges"], "b": []}
    one = AppArgs.model_validate({"model": "synthetic:tiny", "controlnets": [{"name": "edges", "source": "synthetic"}]})
    assert [entry.name for entry in one.served_models()[0].controlnets] == ["edges"]


@pytest.mark.parametrize(
    "args,words",
    [
        ({"controlnets": [{"name": "e", "source": "synthetic"}] * 2}, "named more than once"),
        ({"model": "synthetic:tiny-flux-schnell", "controlnets": [{"name": "e", "source": "synthetic"}]}, "flux"),
        ({"controlnets": [{"name": "e", "source": "synthetic:x"}]}, "synthetic:<integer>"),
        ({"controlnets": [{"name": "e", "source": "not a source"}]}, "cannot read ControlNet source"),
        (
            {"models": [{"id": "a", "model": "synthetic:tiny"}], "controlnets": [{"name": "e", "source": "synthetic"}]},
            "not both",
        ),
    ],
)
def test_refused(args, words):
    with pytest.raises(ValidationError, match=words):
        AppArgs.model_validate(args)


def test_sources():
    assert ControlNetSource.parse("synthetic") == ControlNetSource("synthetic", "0")
    assert ControlNetSource.parse("synthetic:7") == ControlNetSource("synthetic", "7")
    assert ControlNetSource.parse("lllyasviel/control_v11p_sd15_canny").kind == "hub"
    assert str(ControlNetSource.parse("hf:owner/name")) == "hf:owner/name"
