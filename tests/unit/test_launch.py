"""`make serve`'s launcher: configs that cannot run here are refused with one line saying why."""

from __future__ import annotations

import subprocess
import sys

import yaml
from harness import REPO

from serve_app.launch import base_url, gpu_problems


def test_a_gpu_config_on_a_machine_without_one_names_the_key_the_ask_and_the_way_out():
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    [problem] = gpu_problems(config, gpus=0)
    assert "applications[sd].ImageGenerator.ray_actor_options.num_gpus asks for 1 GPU" in problem
    assert "this machine has 0" in problem and "configs/cpu-demo.yaml" in problem
    assert gpu_problems(config, gpus=1) == []
    assert gpu_problems(yaml.safe_load((REPO / "configs" / "cpu-demo.yaml").read_text()), gpus=0) == []


def test_the_launcher_refuses_before_starting_anything():
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.launch", str(REPO / "serve_config.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},  # no nvidia-smi here: no GPU
    )
    assert done.returncode == 1 and "num_gpus asks for 1 GPU per replica" in done.stderr


def test_the_url_printed_is_the_one_the_config_listens_on():
    assert base_url({"http_options": {"host": "0.0.0.0", "port": 9000}}) == "http://127.0.0.1:9000"
    assert base_url({}) == "http://127.0.0.1:8000"
