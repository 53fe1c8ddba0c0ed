"""The benchmarks serve one model of a config: its own options, or a source with the shared ones."""

from harness import load_config

from loadtest.servers import with_one_model
from serve_app.config import AppArgs


def _args(config: dict) -> AppArgs:
    return AppArgs.model_validate(config["applications"][0]["args"])


def test_an_id_of_the_config_keeps_that_models_own_options():
    args = _args(with_one_model(load_config(), "synthetic:tiny-flux-schnell"))
    [served] = args.served_models()
    assert served.source == "synthetic:tiny-flux-schnell" and served.pipeline.max_sequence_length == 64
    assert served.pipeline.torch_threads == 1  # the shared options stay


def test_no_model_is_the_default_and_a_source_gets_the_shared_options():
    assert [m.source for m in _args(with_one_model(load_config())).served_models()] == ["synthetic:tiny"]
    [served] = _args(with_one_model(load_config(), "synthetic:tiny-sd3")).served_models()
    assert served.source == "synthetic:tiny-sd3" and served.pipeline.max_sequence_length is None
