"""Embed serve_config.yaml in deploy/kuberay/rayservice.yaml as spec.serveConfigV2.

    .venv/bin/python deploy/kuberay/sync_serve_config.py          rewrite the manifest (make kuberay-manifest)
    .venv/bin/python deploy/kuberay/sync_serve_config.py --check  exit 1 if the manifest is out of date

serve_config.yaml stays the one description of the production deployment; the
manifest carries a copy (its header comment left out) that this script keeps equal.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "serve_config.yaml"
MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
_BLOCK_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: \|\n$")


def serve_config_body(text: str) -> list[str]:
    """The config's lines without the comment block at its top (which speaks of `serve deploy`)."""
    lines = text.splitlines(keepends=True)
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def render(manifest: str, serve_config: str) -> str:
    """`manifest` with the block under `serveConfigV2: |` replaced by `serve_config`."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK_KEY.match(line)]
    if len(starts) != 1:
        raise ValueError(f"expected one 'serveConfigV2: |' line in the manifest, found {len(starts)}")
    key = starts[0]
    indent = _BLOCK_KEY.match(lines[key])["indent"] + "  "
    end = key + 1
    while end < len(lines) and (lines[end].startswith(indent) or not lines[end].strip()):
        end += 1
    while end > key + 1 and not lines[end - 1].strip():
        end -= 1  # blank lines before the next key are not part of the block
    block = [indent + line if line.strip() else "\n" for line in serve_config_body(serve_config)]
    return "".join(lines[: key + 1] + block + lines[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the manifest is out of date")
    args = parser.parse_args()
    current = MANIFEST.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if args.check:
        if current != wanted:
            sys.exit(f"{MANIFEST.relative_to(REPO)} is out of date with serve_config.yaml: run make kuberay-manifest")
        return
    MANIFEST.write_text(wanted)
    print(f"{MANIFEST.relative_to(REPO)}: serveConfigV2 = serve_config.yaml")


if __name__ == "__main__":
    main()
