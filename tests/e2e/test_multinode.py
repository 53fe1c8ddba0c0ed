"""deploy/local_cluster.py as a user runs it: two Ray nodes, `serve deploy`, replicas on both, clean stop.

It runs as its own process (it starts its own Ray cluster; this pytest process may
already be a driver of the session's in-process one) and reports in JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO

pytestmark = pytest.mark.own_ray  # a cluster of its own: runs last, alone (tests/conftest.py)

SCRIPT = REPO / "deploy" / "local_cluster.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("cluster") / "report.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(path)], capture_output=True, text=True, timeout=540
    )
    assert path.exists(), f"no report (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(path.read_text())
    report["exit_code"] = run.returncode
    return report


def test_two_nodes_with_separate_raylets_join_one_cluster(report):
    nodes = report["nodes"]
    assert len({n["node_id"] for n in nodes}) == 2
    assert sorted(n["is_head_node"] for n in nodes) == [False, True]


def test_generator_replicas_run_on_both_nodes(report, record_property):
    placement = report["placement"]  # replica id -> node id, from Serve's REST API (what `serve status` reads)
    assert len(placement) == 2
    assert set(placement.values()) == {n["node_id"] for n in report["nodes"]}
    for name, seconds in report["timings_s"].items():
        record_property(f"multi-node: {name} (s)", seconds)


def test_requests_are_served_by_both_replicas(report):
    traffic = report["traffic"]
    assert traffic["requests"] > 0 and traffic["ok"] == traffic["requests"]
    by_replica = traffic["by_replica"]
    assert set(by_replica) == set(report["placement"])
    for replica, served in by_replica.items():
        assert served["calls"], f"replica {replica} ran no pipeline call"
        assert served["node_id"] == report["placement"][replica], "the replica reports the node Serve placed it on"


def test_everything_it_started_is_stopped(report):
    assert report["surviving_process_groups"] == []
    for group in report["process_groups"]:
        assert not live_members(group), f"process group {group} still has live processes"
    assert report["exit_code"] == 0


def live_members(group: int) -> list[int]:
    """Processes of a process group, zombies (dead, waiting for PID 1 to reap them) left out."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(pgrp) == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids
