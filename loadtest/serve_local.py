"""Run a Serve config on a fresh local Ray instance of its own: `serve run CONFIG`, for benchmarks.

    python -m loadtest.serve_local configs/cpu-demo.yaml --port 8123

Three differences from a plain `serve run`, all about sharing a machine:
the Ray instance is always a new local one (never another user's cluster
found through RAY_ADDRESS or /tmp/ray), it starts without the dashboard
(about 0.9 GB and a share of a small machine's CPU), and HTTP listens on
127.0.0.1 at the given port whatever the config says. Everything else is
`serve run` itself: the same CLI code validates and deploys the config.
Stop it with SIGINT (Ctrl-C): Serve and the Ray instance shut down.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.serve_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a Serve config file, e.g. configs/cpu-demo.yaml")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    config = yaml.safe_load(args.config.read_text())
    config.setdefault("http_options", {}).update(host="127.0.0.1", port=args.port)
    with tempfile.TemporaryDirectory(prefix="serve-local-") as tmp:
        local_config = Path(tmp) / args.config.name
        local_config.write_text(yaml.safe_dump(config, sort_keys=False))

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray
        from ray.serve.scripts import run

        ray.init(address="local", include_dashboard=False, namespace="serve")
        # `serve run` reuses an initialised Ray; it blocks until SIGINT, then shuts Serve down.
        run.main([str(local_config)], prog_name="serve run", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
