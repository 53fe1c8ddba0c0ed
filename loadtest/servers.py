"""Start and stop the servers a benchmark compares, each as its own process on 127.0.0.1.

A `ServerProcess` runs in a new session (its own process group), waits until
its readiness URL answers, and stops with SIGINT to its PID (Serve and Ray
shut down cleanly on it), then SIGKILL to its process group if it is still
alive after a grace period. Nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def with_one_model(config: dict, model: str | None = None) -> dict:
    """`config` (edited in place, and returned) serving one model: `model` as an id of its `models` (with that
    entry's own pipeline options, defaults and limits), else as a model source with the shared options;
    None: the config's default model. The benchmarks compare one model's engines or families."""
    args = config["applications"][0].setdefault("args", {})
    entries = args.pop("models", None) or []
    default_id = args.pop("default_model", None)
    args.pop("max_models_per_replica", None)
    wanted = model or default_id or (entries[0]["id"] if entries else args.get("model"))
    entry = next((e for e in entries if e["id"] == wanted), None)
    if entry is None:
        args["model"] = wanted or "synthetic:tiny"
        return config
    args["model"] = entry["model"]
    for key in ("pipeline", "defaults", "limits"):
        if entry.get(key):
            args[key] = {**args.get(key, {}), **entry[key]}
    if entry.get("refiner"):
        args["refiner"] = entry["refiner"]
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int, ready_path: str, log_path: Path, env=None):
        self.name = name
        self.command = command
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_path
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=10).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"{self.name} not ready at {self.url}{self.ready_path} after {timeout_s}s:\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own group: only what it started
            self.process.wait()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by the live processes this server started, summed by process name."""
        return session_cpu_seconds(self.process.pid) if self.process else {}

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def process_name(command: str) -> str:
    """A short stable name for a command line: "ray::ServeReplica:sd:Ingress.handle" -> "Ingress",
    "/x/raylet --flags" -> "raylet", "/x/python -u /y/log_monitor.py --flags" -> "log_monitor"."""
    words = command.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):  # a Ray worker's title: ray::<actor class or replica>.<method>
        return words[0].removeprefix("ray::").split(".")[0].rpartition(":")[2]
    program = Path(words[0]).name
    if program.startswith("python"):
        script = next((w for w in words[1:] if w.endswith(".py")), None)
        module = words[words.index("-m") + 1] if "-m" in words[:-1] else None
        return Path(script).stem if script else module or program
    return program


def session_cpu_seconds(session_id: int) -> dict[str, float]:
    """CPU seconds (user + system) of each live process in a session, summed by name (Linux /proc; else empty).

    CPU time per image stays meaningful on a busy machine, where wall-clock throughput does not.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    totals: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) != session_id:  # field 6 of stat, the session id
                continue
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        name = process_name(command)
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def serve_server(
    config: Path, log_dir: Path, port: int | None = None, ready_path: str = "/info", env: dict | None = None
) -> ServerProcess:
    """This project on Ray Serve, from a Serve config; ready once /info answers from a generator replica (with API
    keys on, /info needs one: wait for /readyz instead). `env`: more variables for it (a keys variable, say)."""
    port = port or free_port()
    command = [sys.executable, "-m", "loadtest.serve_local", str(config), "--port", str(port)]
    return ServerProcess("serve", command, port, ready_path, log_dir / "serve.log", env)


def baseline_server(
    model: str,
    device: str,
    log_dir: Path,
    threads: int | None = None,
    dtype: str = "auto",
    defaults: dict | None = None,
    port: int | None = None,
) -> ServerProcess:
    """The unbatched FastAPI baseline (loadtest/baseline_server.py) under uvicorn."""
    port = port or free_port()
    command = [sys.executable, "-m", "loadtest.baseline_server", "--model", model, "--device", device]
    command += ["--dtype", dtype, "--defaults", json.dumps(defaults or {}), "--port", str(port)]
    env = {}
    if threads:
        command += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)  # as Ray does for a replica with num_cpus: threads
    return ServerProcess("baseline", command, port, "/healthz", log_dir / "baseline.log", env)


def s3_server(log_dir: Path, port: int | None = None) -> ServerProcess:
    """An S3-protocol server on 127.0.0.1 (moto's, `pip install 'moto[server]'`): a local object store for the
    tests and the store benchmark. Clients find it through `s3_env(server)`; buckets are made on demand."""
    port = port or free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return ServerProcess("s3", command, port, "/moto-api/", log_dir / "s3.log")


def s3_env(server: ServerProcess) -> dict[str, str]:
    """The standard AWS variables that point boto (s3fs, boto3) at `server`: endpoint, region, test credentials."""
    return {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
