"""Start real Ray Serve in-process from a Serve config file, the way `serve run CONFIG` does.

`serve run` validates the YAML with Ray's ServeDeploySchema, starts Serve with
the file's http_options and submits the whole config to the controller, which
calls our app builder with `args` and applies the `deployments` overrides.
We do the same (through the same calls) so tests exercise the real config path,
with the port swapped for a free one on 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))
# One way to choose ports, deploy/local_cluster.py's (free_port: for the test modules).
from local_cluster import free_port, free_ports  # noqa: E402, F401

DEMO_CONFIG = REPO / "configs" / "cpu-demo.yaml"
APP_NAME = "sd"
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy, and return that; AssertionError after `timeout_s`.

    The way tests synchronise with a server: on a state it reports, never on time passing.
    `what` completes "timed out waiting until ..." in the error, with the last value seen.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what} (last: {value!r})")
        time.sleep(interval_s)


FINAL_JOB_STATES = ("succeeded", "failed", "canceled")


def job_when_final(http: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    """GET /jobs/{id} until the job has ended (succeeded, failed or canceled); its view then."""
    return wait_until(
        lambda: (job := http.get(f"/jobs/{job_id}").json())["status"] in FINAL_JOB_STATES and job,
        timeout_s,
        f"job {job_id} ends",
    )


def open_request(url: str, path: str, body: dict) -> socket.socket:
    """POST `body` (JSON) to `path` on a connection of its own, and return the connection without reading the
    answer: closing it is a caller hanging up (Serve's proxy then cancels the request and its calls)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    caller = socket.create_connection((host, int(port)))
    caller.sendall(
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), len(data), data)
    )
    return caller


def generator_jobs(http: httpx.Client) -> dict:
    """The Generator's image counters from /info: received, succeeded, failed, cancelled_before_start, ...
    (counts since that replica started; `waiting` and `running` are now). Serve routes /info to one
    Generator replica: exact where the config runs one."""
    response = http.get("/info")
    assert response.status_code == 200, response.text
    return response.json()["generator"]["images"]


# The longest image the demo config allows (configs/cpu-demo.yaml: 50 steps, 256x256), with a sampler that
# calls the UNet twice per step (Heun: 99 calls): about a minute here, one torch thread on a busy 2-core box.
# Work a test cancels, or needs running while it acts, is this long: it cannot end before the test's next
# few calls land. Such a test ends it itself (cancels it), and never waits for it to finish.
DEMO_LONGEST = {"num_inference_steps": 50, "width": 256, "height": 256, "scheduler": "heun"}


def quiet(http: httpx.Client, timeout_s: float = 120) -> dict:
    """Wait until the server holds no work (no unfinished job in the JobManager, no image waiting or being
    denoised in the Generator) and return the Generator's image counters then: the baseline from which a
    test counts what its own actions did (`counted_since`), whatever earlier tests left running."""

    def idle() -> dict | None:
        response = http.get("/info")
        assert response.status_code == 200, response.text
        info = response.json()
        images, manager = info["generator"]["images"], info.get("job_manager") or {}
        busy = images["waiting"] + images["running"] + manager.get("queued", 0) + manager.get("running", 0)
        return None if busy else images

    return wait_until(idle, timeout_s, "the server holds no work")


def counted_since(before: dict, after: dict) -> dict:
    """What each counter of `generator_jobs` / `quiet` gained from `before` to `after`."""
    numbers = (int, float)
    return {
        key: value - before[key]
        for key, value in after.items()
        if isinstance(value, numbers) and isinstance(before.get(key), numbers)
    }


# Where the tests' servers keep jobs: one directory per test session, never the repository's ./outputs.
TEST_JOB_STORE = Path(tempfile.mkdtemp(prefix="sd-serve-test-jobs-"))


def load_config(path: Path = DEMO_CONFIG) -> dict:
    """A Serve config file as a dict, its job store moved to this session's temporary directory."""
    config = yaml.safe_load(Path(path).read_text())
    for app in config.get("applications", []):
        args = app.setdefault("args", {})
        args.setdefault("jobs", {}).setdefault("store", str(TEST_JOB_STORE))
    return config


# Two synthetic models of one architecture with other weights: every image tells which made it.
TWO_TINY_MODELS = [
    {"id": "tiny", "model": "synthetic:tiny"},
    {"id": "tiny-b", "model": "synthetic:tiny", "pipeline": {"seed": 1}},
]


def serve_models(config: dict, models: list[dict], max_per_replica: int) -> None:
    """Edit the config in place: its first application serves `models` (the first the default)."""
    args = config["applications"][0]["args"]
    args.pop("model", None)
    args["models"] = models
    args["max_models_per_replica"] = max_per_replica


def with_every_family(config: dict) -> None:
    """Edit the demo config in place: beside its UNet and FLUX.1 [schnell], SD 3.5 and the inpainting UNet, all four
    loaded at once (no eviction between tests). One variant for test_metrics, test_families and test_edits: deployed
    by the first of them, it costs the others nothing (tests/conftest.py runs them one after the other)."""
    args = config["applications"][0]["args"]
    args["models"] += [
        {"id": "synthetic:tiny-sd3", "model": "synthetic:tiny-sd3", "pipeline": {"max_sequence_length": 64}},
        {"id": "synthetic:tiny-inpaint", "model": "synthetic:tiny-inpaint"},
    ]
    args["max_models_per_replica"] = len(args["models"])


# The tenants variant (with_tenants): named keys with policies (test_fairness), unnamed keys (test_auth).
TENANT_KEYS = {"heavy": "fair-heavy", "light": "fair-light", "rated": "fair-rated", "capped": "fair-capped"}
PLAIN_KEYS = ("key-one", "key-two")
ALLOWED_ORIGIN = "http://allowed.test"
# The ingress holds few synchronous requests, so that a burst of a few hundred is far above it.
TENANTS_MAX_CONCURRENT = 48


def with_tenants(config: dict, folder: Path) -> None:
    """Edit the demo config in place: API keys (written to folder/api-keys), policies for three of them, CORS for
    ALLOWED_ORIGIN, its job store in `folder`. One variant for test_auth and test_fairness (one deploy for both, as
    tests/conftest.py runs them one after the other; `folder`: the session's `tenants_folder`)."""
    keys_file = folder / "api-keys"
    keys_file.write_text("".join(f"{name} {key}\n" for name, key in TENANT_KEYS.items()) + "\n".join(PLAIN_KEYS))
    args = config["applications"][0]["args"]
    args["auth"] = {"api_keys_file": str(keys_file)}
    args["cors"] = {"allow_origins": [ALLOWED_ORIGIN]}
    args["jobs"] = {"store": str(folder / "store")}
    args["limits"]["max_concurrent_requests"] = TENANTS_MAX_CONCURRENT
    args["tenants"] = {
        "keys": {"light": {"max_priority": "high"}, "rated": {"rate": 2, "burst": 2}, "capped": {"quota": 3}}
    }


def deployment(config: dict, name: str) -> dict:
    """The `deployments` entry called `name` in the first application (created if missing)."""
    entries = config["applications"][0].setdefault("deployments", [])
    for entry in entries:
        if entry["name"] == name:
            return entry
    entries.append({"name": name})
    return entries[-1]


@dataclass
class ServeCluster:
    """A local Ray instance with Serve listening on 127.0.0.1:port, its Prometheus metrics on metrics_port."""

    port: int
    metrics_port: int
    request_timeout_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @classmethod
    def start(cls, num_cpus: int = 4, request_timeout_s: float | None = 75) -> ServeCluster:
        import ray
        from ray.serve._private import api as serve_private_api

        metrics_port, port = free_ports(2)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace="serve",
            log_to_driver=False,
            _metrics_export_port=metrics_port,
            # Workers report metrics to the node's agent every second (default 10 s): quicker scrapes in tests.
            _system_config={"metrics_report_interval_ms": 1000},
        )
        cluster = cls(port=port, metrics_port=metrics_port, request_timeout_s=request_timeout_s)
        http_options = {"host": "127.0.0.1", "port": cluster.port}
        if request_timeout_s is not None:
            http_options["request_timeout_s"] = request_timeout_s
        serve_private_api.serve_start(http_options=http_options)
        return cluster

    def deploy(self, config: dict, timeout_s: float = 180) -> None:
        """Submit a config (its http_options are ignored: this cluster's stand) and wait until RUNNING."""
        from ray import serve
        from ray.serve._private.api import serve_start
        from ray.serve.schema import ServeDeploySchema

        config = copy.deepcopy(config)
        config.pop("http_options", None)
        config["proxy_location"] = "HeadOnly"
        client = serve_start()
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        names = [app["name"] for app in config["applications"]]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            apps = serve.status().applications
            states = {name: apps.get(name) for name in names}
            failed = [f"{n}: {s.message}" for n, s in states.items() if s and s.status == "DEPLOY_FAILED"]
            if failed:
                raise RuntimeError("deployment failed:\n" + "\n".join(failed))
            if all(s and s.status == "RUNNING" for s in states.values()):
                return
            time.sleep(0.1)
        raise TimeoutError(f"applications {names} not RUNNING after {timeout_s}s: {serve.status().applications}")

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
