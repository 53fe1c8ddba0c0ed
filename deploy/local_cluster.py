"""A multi-node Ray cluster on one machine, deployed with `serve deploy`, then shut down.

    .venv/bin/python deploy/local_cluster.py [--hold SECONDS] [--report FILE]   (or: make local-cluster)

Starts a Ray head and a worker node (`ray start --head`, `ray start --address`:
two raylets, as on two machines), deploys the demo application with two
ImageGenerator replicas through the dashboard's REST API (`serve deploy`),
shows on which node each replica runs, sends traffic until both replicas have
served it, and stops everything it started. Each node gets one logical CPU and
each replica asks for one, so the replicas must land on different nodes.

What listens where: Serve's HTTP proxy and the dashboard on 127.0.0.1 (free
ports); Ray's internal ports (GCS, raylets, agents) on the node address Ray
picks, since Ray 2.60 turns 127.0.0.1 into that address itself. All ports are
chosen free, so this runs beside other Ray instances on the same machine.

Shutdown touches only what this script started: every `ray start` runs in a new
session, and all of a node's processes (GCS, raylet, agents, workers) stay in
that process group, which gets SIGTERM and, after a grace period, SIGKILL.
(`ray stop` would stop every Ray instance on the machine.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray and serve CLIs of this virtualenv
APP = "sd"
GENERATOR = "ImageGenerator"


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1. Each socket stays bound until all are chosen: a port just
    closed may be handed out again at once, and two Ray components given one port fail to start."""
    with ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


# The ports each node listens on besides the head's own (GCS, dashboard, Ray client), chosen with them.
NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class LocalRayCluster:
    """Ray nodes on this machine, each started by `ray start` in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        # Ray 2.60 turns on token auth once ~/.ray/auth_token exists; a local cluster runs without it.
        self.env["RAY_AUTH_MODE"] = "disabled"
        self.process_groups: list[int] = []
        self.gcs_address = ""
        self.dashboard_url = ""

    def _ray_start(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.log").open("w")
        command = [str(BIN / "ray"), "start", *args, f"--temp-dir={self.root / name}", "--disable-usage-stats"]
        # start_new_session: this node's daemons inherit a process group of their own, stopped as one.
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.process_groups.append(process.pid)
        if process.wait(timeout=180) != 0:
            raise RuntimeError(f"ray start for {name} failed; see {log.name}:\n{Path(log.name).read_text()[-3000:]}")

    @staticmethod
    def _node_ports(ports: list[int]) -> list[str]:
        flags = [f"{flag}={port}" for flag, port in zip(NODE_PORT_FLAGS, ports, strict=True)]
        return [*flags, "--object-store-memory=100000000"]

    def start_head(self, num_cpus: int) -> None:
        gcs_port, dashboard_port, client_port, *node_ports = free_ports(3 + len(NODE_PORT_FLAGS))
        self._ray_start(
            "head",
            [
                "--head",
                f"--port={gcs_port}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                # The dashboard serves the REST API that `serve deploy` and `serve status` talk to.
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={client_port}",
                *self._node_ports(node_ports),
            ],
        )
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"

    def add_worker(self, name: str, num_cpus: int, labels: dict[str, str] | None = None) -> int:
        """Start a worker node (`labels`: Ray node labels, for `label_selector` in ray_actor_options); returns
        its process group, which `kill_node` takes."""
        extra = ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())] if labels else []
        self._ray_start(
            name,
            [
                f"--address={self.gcs_address}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                *extra,
                *self._node_ports(free_ports(len(NODE_PORT_FLAGS))),
            ],
        )
        return self.process_groups[-1]

    def kill_node(self, group: int) -> None:
        """SIGKILL every process of one node (raylet, agents, its workers and replicas), as a lost machine."""
        os.killpg(group, signal.SIGKILL)

    def nodes(self) -> list[dict]:
        """Alive nodes from Ray's state API: node_id, is_head_node, resources_total."""
        reply = http_json("GET", f"{self.dashboard_url}/api/v0/nodes?detail=1&limit=100")
        return [node for node in reply["data"]["result"]["result"] if node["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                nodes = self.nodes()
                if len(nodes) == count:
                    return nodes
            except OSError:
                pass  # the dashboard is still starting
            time.sleep(0.5)
        raise TimeoutError(f"{count} nodes not alive after {timeout_s}s")

    def serve(self, *args: str) -> None:
        subprocess.run([str(BIN / "serve"), *args, "--address", self.dashboard_url], env=self.env, check=True)

    def serve_shutdown(self, timeout_s: float = 60) -> None:
        """Delete the applications and wait until they are gone, so replicas finish what they hold."""
        self.serve("shutdown", "--yes")
        deadline = time.monotonic() + timeout_s
        while self.serve_details().get("applications") and time.monotonic() < deadline:
            time.sleep(0.5)

    def serve_details(self) -> dict:
        """What `serve status` reads: applications, deployments, and each replica's node."""
        return http_json("GET", f"{self.dashboard_url}/api/serve/applications/")

    def wait_until_running(self, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = self.serve_details().get("applications", {}).get(APP)
            if app and app["status"] == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy failed: {app['message']}")
            if app and app["status"] == "RUNNING":
                return app
            time.sleep(1)
        raise TimeoutError(f"application {APP} not RUNNING after {timeout_s}s")

    def alive_process_groups(self) -> list[int]:
        """Groups with a live member. Zombies do not count: PID 1 reaps them once their parent is gone."""
        alive = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except OSError:
                continue  # the process exited meanwhile
            if int(group) in self.process_groups and state != "Z":
                alive.add(int(group))
        return sorted(alive)

    def stop(self, grace_s: float = 5) -> list[int]:
        """Stop every node (workers first); returns the process groups still alive after it (none, normally).

        Raylets exit on SIGTERM within ~10 s, the GCS not at all: like `ray stop`, what is left after the
        grace period gets SIGKILL. Serve should be shut down before (replicas drain there, not here).
        """
        for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            for group in reversed(self.alive_process_groups()):
                try:
                    os.killpg(group, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self.alive_process_groups() and time.monotonic() < deadline:
                time.sleep(0.25)
        return self.alive_process_groups()


def two_replica_config(http_port: int) -> dict:
    """The offline demo config with two generator replicas of one CPU each, Serve HTTP on 127.0.0.1:http_port."""
    config = yaml.safe_load((REPO / "configs" / "cpu-demo.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one HTTP proxy: the nodes share one loopback interface
    config["http_options"].update(host="127.0.0.1", port=http_port)
    [app] = config["applications"]
    generator = next(d for d in app["deployments"] if d["name"] == GENERATOR)
    generator["num_replicas"] = 2
    generator["ray_actor_options"] = {"num_cpus": 1}
    return config


def send_traffic_until_both_replicas_served(url: str, replicas: set[str], timeout_s: float = 120) -> dict:
    """Bursts of concurrent /generate requests; /info (answered by one replica at a time) says who ran them."""
    calls: dict[str, dict] = {}
    statuses: list[int] = []

    def post(i: int) -> int:
        request = urllib.request.Request(
            f"{url}/generate",
            data=json.dumps({"prompt": f"node test {i}", "seed": i}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status

    deadline = time.monotonic() + timeout_s
    with ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline:
            statuses += pool.map(post, range(len(statuses), len(statuses) + 16))
            for _ in range(8):
                info = http_json("GET", f"{url}/info")["generator"]
                calls[info["replica"]] = {"node_id": info["node_id"], "calls": info["model_calls_by_batch_size"]}
            if {r for r, c in calls.items() if c["calls"]} >= replicas:
                break
    return {"requests": len(statuses), "ok": statuses.count(200), "by_replica": calls}


def run(hold_s: float) -> dict:
    report: dict = {"timings_s": {}}
    timings = report["timings_s"]
    root = Path(tempfile.mkdtemp(prefix="sd-cluster-"))  # short: Ray's socket paths must stay under 108 bytes
    cluster = LocalRayCluster(root)
    report["logs"] = str(root)
    print(f"node logs and temp files: {root}")
    try:
        started = time.monotonic()
        cluster.start_head(num_cpus=1)
        cluster.add_worker("worker-1", num_cpus=1)
        nodes = cluster.wait_for_nodes(2)
        timings["start_two_nodes"] = round(time.monotonic() - started, 1)
        report["nodes"] = [{"node_id": n["node_id"], "is_head_node": n["is_head_node"]} for n in nodes]
        report["process_groups"] = list(cluster.process_groups)

        http_port = free_port()
        config_path = root / "serve-config.yaml"
        config_path.write_text(yaml.safe_dump(two_replica_config(http_port), sort_keys=False))
        started = time.monotonic()
        cluster.serve("deploy", str(config_path))
        app = cluster.wait_until_running()
        timings["serve_deploy_to_running"] = round(time.monotonic() - started, 1)
        replicas = app["deployments"][GENERATOR]["replicas"]
        report["placement"] = {r["replica_id"]: r["node_id"] for r in replicas}
        print("generator replicas by node:", json.dumps(report["placement"], indent=2))

        url = f"http://127.0.0.1:{http_port}"
        started = time.monotonic()
        report["traffic"] = send_traffic_until_both_replicas_served(url, set(report["placement"]))
        timings["traffic"] = round(time.monotonic() - started, 1)
        print("traffic:", json.dumps(report["traffic"], indent=2))
        if hold_s > 0:
            print(f"holding for {hold_s:.0f}s: {url}  (dashboard {cluster.dashboard_url})")
            time.sleep(hold_s)

        started = time.monotonic()
        cluster.serve_shutdown()
        timings["serve_shutdown"] = round(time.monotonic() - started, 1)
    finally:
        started = time.monotonic()
        report["surviving_process_groups"] = cluster.stop()
        timings["stop_nodes"] = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", type=float, default=0, help="seconds to keep the cluster up after the traffic")
    parser.add_argument("--report", type=Path, help="write the placement, traffic and timings here as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the nodes' logs even when all went well")
    args = parser.parse_args()
    report = run(args.hold)
    print("timings (s):", report["timings_s"])
    on_both = len(set(report["placement"].values())) == 2
    served_by_both = all(c["calls"] for c in report["traffic"]["by_replica"].values())
    ok = on_both and served_by_both and not report["surviving_process_groups"]
    if ok and not args.keep_logs:
        shutil.rmtree(report.pop("logs"))
    else:
        print(f"node logs: {report['logs']}")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
