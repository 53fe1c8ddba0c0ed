import pytest

from serve_app.pipeline.loading import ModelSource, ModelSourceError, PipelineOptions, load_pipeline
from serve_app.pipeline.synthetic import save_pipeline


@pytest.mark.parametrize(
    ("text", "kind", "location"),
    [
        ("synthetic:tiny", "synthetic", "tiny"),
        ("stabilityai/sd-turbo", "hub", "stabilityai/sd-turbo"),
        ("hf:stabilityai/sdxl-turbo", "hub", "stabilityai/sdxl-turbo"),
    ],
)
def test_model_sources(text, kind, location):
    source = ModelSource.parse(text)
    assert (source.kind, source.location) == (kind, location)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("synthetic:huge", "unknown synthetic preset 'huge'"),
        ("/no/such/dir", "does not exist"),
        ("just-a-name", "cannot read model source"),
    ],
)
def test_unreadable_model_sources_say_what_is_wrong(text, message):
    with pytest.raises(ModelSourceError, match=message):
        ModelSource.parse(text)


def test_local_directory_must_be_a_diffusers_pipeline(tmp_path):
    with pytest.raises(ModelSourceError, match="model_index.json"):
        ModelSource.parse(str(tmp_path))


def test_local_directory_loads(tmp_path):
    save_pipeline("tiny", tmp_path / "m")
    source = ModelSource.parse(str(tmp_path / "m"))
    assert source.kind == "local"
    pipe = load_pipeline(source, PipelineOptions(device="cpu"))
    assert str(pipe.device) == "cpu" and len(pipe.tokenizer) == 514


def test_hub_model_offline_fails_clearly_not_with_random_weights(tmp_path):
    options = PipelineOptions(device="cpu", local_files_only=True, cache_dir=str(tmp_path))
    with pytest.raises(ModelSourceError, match="cannot load model hf:stabilityai/sd-turbo"):
        load_pipeline(ModelSource.parse("stabilityai/sd-turbo"), options)


def test_xformers_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers.*CUDA"):
        load_pipeline(ModelSource.parse("synthetic:tiny"), PipelineOptions(device="cpu", attention="xformers"))


def test_cuda_without_a_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_pipeline(ModelSource.parse("synthetic:tiny"), PipelineOptions(device="cuda"))


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="extra"):
        PipelineOptions(devise="cpu")
