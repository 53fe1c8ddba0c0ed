"""`sd-serve bulk` settings: a Serve config's model, options and limits; the actor pool the cluster allows."""

from __future__ import annotations

import pytest
import yaml

from serve_app.bulk.command import build_settings
from serve_app.bulk.runner import _fit_to_cluster, _rows_per_task
from serve_app.bulk.settings import BulkSettings, SettingsError, WorkerPool
from serve_app.cli import build_parser
from tests.harness import DEMO_CONFIG


def settings_of(*argv: str) -> BulkSettings:
    return build_settings(build_parser().parse_args(["bulk", "in.jsonl", "out", *argv]))


def test_a_serve_config_gives_the_model_its_options_limits_and_batching():
    settings = settings_of("--config", str(DEMO_CONFIG))
    assert settings.model == "synthetic:tiny"
    assert settings.pipeline.device == "cpu" and settings.pipeline.torch_threads == 1
    assert settings.limits.max_width == 256 and settings.limits.max_steps == 50
    assert settings.max_batch_size == 8 and settings.rows_per_call == 16


def test_a_config_with_several_models_runs_its_default_or_the_one_named_with_that_models_options(tmp_path):
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    args = config["applications"][0]["args"]
    args["models"] = [
        {"id": "tiny", "model": "synthetic:tiny"},
        {"id": "xl", "model": "synthetic:tiny-xl", "pipeline": {"seed": 3}, "limits": {"max_width": 512}},
    ]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    default = settings_of("--config", str(path))
    assert default.model == "synthetic:tiny" and default.limits.max_width == 256
    named = settings_of("--config", str(path), "--model", "xl")
    assert named.model == "synthetic:tiny-xl" and named.pipeline.seed == 3 and named.limits.max_width == 512
    # A source instead of an id: that model, with the config's shared options.
    source = settings_of("--config", str(path), "--model", "synthetic:tiny-xl")
    assert source.model == "synthetic:tiny-xl" and source.pipeline.seed == 0 and source.limits.max_width == 256
    # Neither an id nor a source: a misspelt id, most likely; the config's ids are listed.
    with pytest.raises(SettingsError, match=r"'xll' is not one of .*models.yaml's models \(tiny, xl\)"):
        settings_of("--config", str(path), "--model", "xll")


def test_options_override_the_config_and_row_values_are_defaults_for_rows():
    settings = settings_of(
        "--config", str(DEMO_CONFIG), "--engine", "request", "--max-batch-size", "4", "--size", "128x64",
        "--steps", "3", "--format", "webp", "--base-seed", "7", "--workers", "1-3", "--no-sort",
    )  # fmt: skip
    assert settings.pipeline.engine == "request" and settings.max_batch_size == 4
    assert settings.row_defaults == {"width": 128, "height": 64, "num_inference_steps": 3, "output_format": "webp"}
    assert settings.base_seed == 7 and not settings.sort
    assert (settings.workers.min_workers, settings.workers.max_workers) == (1, 3)


def test_bulk_runs_the_request_engine_on_sorted_rows_and_the_step_engine_otherwise():
    assert settings_of("--config", str(DEMO_CONFIG)).pipeline.engine == "request"
    assert settings_of("--config", str(DEMO_CONFIG), "--no-sort").pipeline.engine == "step"
    assert settings_of("--model", "synthetic:tiny", "--engine", "step").pipeline.engine == "step"


def test_a_model_must_be_named_and_bad_values_say_what_is_wrong():
    with pytest.raises(SettingsError, match="--model"):
        settings_of()
    with pytest.raises(SettingsError, match="--workers"):
        settings_of("--model", "synthetic:tiny", "--workers", "many")
    with pytest.raises(SettingsError, match="below min_workers"):
        settings_of("--model", "synthetic:tiny", "--workers", "3-1")
    with pytest.raises(SettingsError, match="base_seed"):
        settings_of("--model", "synthetic:tiny", "--base-seed", "-1")
    with pytest.raises(SettingsError, match="unknown synthetic preset"):
        settings_of("--model", "synthetic:nope")


def test_without_gpus_one_worker_per_cpu_slot_leaving_one_cpu_for_reading_and_writing():
    settings, pool = _fit_to_cluster(BulkSettings(model="synthetic:tiny"), {"CPU": 2.0})
    assert (pool.min_workers, pool.max_workers, pool.gpus) == (1, 1, 0)
    assert settings.pipeline.torch_threads == 1  # torch takes the worker's CPUs, not the machine's
    _, pool = _fit_to_cluster(BulkSettings(model="m/x", workers=WorkerPool(cpus_per_worker=2)), {"CPU": 9.0})
    assert pool.max_workers == 4 and pool.cpus == 2


def test_with_gpus_one_worker_per_gpu():
    settings, pool = _fit_to_cluster(BulkSettings(model="m/x"), {"CPU": 32.0, "GPU": 4.0})
    assert (pool.max_workers, pool.gpus) == (4, 1.0) and settings.pipeline.torch_threads is None
    _, pool = _fit_to_cluster(BulkSettings(model="m/x", workers=WorkerPool(max_workers=2)), {"CPU": 8, "GPU": 4})
    assert pool.max_workers == 2
    with pytest.raises(SettingsError, match="needs GPUs"):
        _fit_to_cluster(BulkSettings(model="m/x", pipeline={"device": "cuda"}), {"CPU": 8.0})


def test_tasks_are_whole_worker_calls_small_enough_for_every_worker_to_get_several():
    settings = BulkSettings(model="m/x", max_batch_size=4)  # 8 rows per call
    assert _rows_per_task(settings, rows=32, workers=1) == 8
    assert _rows_per_task(settings, rows=10**6, workers=8) == 128
    assert _rows_per_task(settings, rows=400, workers=2) == 56
    assert _rows_per_task(settings.model_copy(update={"rows_per_task": 5}), rows=1000, workers=2) == 5
