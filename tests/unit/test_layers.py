"""The layer rules of DESIGN.md, checked: arrows point down only."""

import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_ingress_never_imports_torch():
    loaded = _modules_after_import("serve_app.ingress")
    assert "torch" not in loaded and "diffusers" not in loaded


def test_pipeline_layer_knows_nothing_of_ray_or_http():
    loaded = _modules_after_import("serve_app.pipeline.model")
    assert not {"ray", "fastapi", "starlette"} & loaded


def test_client_and_cli_speak_http_only():
    # They run on laptops and CI boxes without torch; `sd-serve synth` loads it only when it runs.
    loaded = _modules_after_import("serve_app.cli")
    assert "serve_app.client" in loaded
    assert not {"torch", "ray", "diffusers", "transformers", "fastapi"} & loaded
