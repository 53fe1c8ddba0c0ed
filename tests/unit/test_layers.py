"""The layer rules of DESIGN.md, checked: arrows point down only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "serve_app"


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def _imports_of(path: Path) -> set[str]:
    """The modules a file imports (at any depth: lazy imports inside functions count too)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((PACKAGE / folder).rglob("*.py"))]


def _offenders(files: list[Path], forbidden: str) -> dict[str, set[str]]:
    found = {}
    for path in files:
        bad = {name for name in _imports_of(path) if name == forbidden or name.startswith(forbidden + ".")}
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


@pytest.mark.slow  # seconds: out of the fast loop
def test_ingress_never_imports_torch():
    loaded = _modules_after_import("serve_app.ingress")
    assert "torch" not in loaded and "diffusers" not in loaded


@pytest.mark.slow  # seconds: out of the fast loop
def test_pipeline_layer_knows_nothing_of_ray_or_http():
    loaded = _modules_after_import("serve_app.pipeline.model")
    assert not {"ray", "fastapi", "starlette"} & loaded


def test_the_pipeline_layer_imports_nothing_above_it():
    for above in ("serve_app.service", "serve_app.api", "serve_app.job_queue", "serve_app.bulk", "serve_app.generator"):
        assert _offenders(_files("pipeline"), above) == {}, above


def test_services_job_queue_and_bulk_import_nothing_from_the_http_layer():
    assert _offenders(_files("service", "job_queue", "bulk"), "serve_app.api") == {}
    assert _offenders([PACKAGE / "generator.py"], "serve_app.api") == {}


def test_no_routes_module_imports_another_family():
    routes = sorted(PACKAGE.glob("api/*/routes.py"))
    assert len(routes) >= 4
    for path in routes:
        family = path.parent.name
        others = [other.parent.name for other in routes if other.parent.name != family]
        for other in others:
            assert _offenders([path], f"serve_app.api.{other}.routes") == {}, (family, other)


@pytest.mark.slow  # seconds: out of the fast loop
def test_the_service_layer_speaks_no_http_and_loads_no_torch():
    # The JobManager and bulk workers import it where no HTTP is served; the ingress where there is no GPU.
    for web in ("fastapi", "starlette"):
        assert _offenders(_files("service"), web) == {}, web
    assert "torch" not in _modules_after_import("serve_app.service.jobs")


def test_client_and_cli_speak_http_only():
    # They run on laptops and CI boxes without torch; `sd-serve synth` loads it only when it runs.
    loaded = _modules_after_import("serve_app.cli")
    assert "serve_app.client" in loaded
    assert not {"torch", "ray", "diffusers", "transformers", "fastapi"} & loaded
