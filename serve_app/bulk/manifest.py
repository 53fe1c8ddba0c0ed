"""The output of a bulk run: where images and the manifest go, and what a run already finished.

    OUTPUT/images/0000/00000012-12.png     image of row 12 (seed 12); 1000 rows per folder
    OUTPUT/manifest.parquet                 one entry per row: parameters as run, seed, files, status, error
    OUTPUT/bulk.json                        what made this output (input, model, base seed): a re-run must match
    OUTPUT/_manifest_parts/RUN/*.parquet    entries as a run finishes them (Ray Data's write), merged into
                                            the manifest when the run ends

OUTPUT is a directory or any fsspec URL. Resuming reads the manifest and every part (a run
that was killed left parts, not a manifest); a part cut short by the kill is skipped and its
rows run again. A row is finished when an entry says `done`: a re-run skips it and runs every
other row, failed ones included. Merging keeps one entry per row: `done` over `failed`, then
the latest.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest"
PARTS_DIR = "_manifest_parts"  # Ray Data's readers skip names starting with "_"
RUN_RECORD = "bulk.json"
DONE, FAILED = "done", "failed"

SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_code", pa.string()),
        ("error_field", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("scheduler", pa.string()),
        ("seed", pa.int64()),
        ("num_images", pa.int32()),
        ("output_format", pa.string()),
        ("quality", pa.int32()),
        ("file", pa.string()),
        ("files", pa.list_(pa.string())),
        ("request", pa.string()),
        ("model", pa.string()),
        ("batch_size", pa.int32()),
        ("generation_time_s", pa.float64()),
        ("warnings", pa.list_(pa.string())),
        ("node_id", pa.string()),
        ("run_id", pa.string()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent starts."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


class Output:
    """The output location: an fsspec filesystem and the root path in it. Pickles as its URL (a local
    path made absolute), so a worker on another node opens the same location."""

    def __init__(self, url: str):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        self.url = self.root if self.is_local else url

    def __reduce__(self):
        return (Output, (self.url,))

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def describe(self, relative: str = "") -> str:
        """A path a person can paste: the local path, or the URL."""
        base = self.root if self.is_local else self.url.rstrip("/")
        return f"{base}/{relative}" if relative else base

    @property
    def arrow_fs(self):
        """The same filesystem for pyarrow and Ray Data's writers."""
        import pyarrow.fs

        if self.is_local:
            return pyarrow.fs.LocalFileSystem()
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    def makedirs(self, relative: str) -> None:
        self.fs.makedirs(self.path(relative), exist_ok=True)

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Whole or not at all: a run killed mid-write leaves no truncated file under the final name.
        (On object stores a PUT is atomic already.)"""
        path = self.path(relative)
        if self.is_local:
            partial = f"{path}.{os.getpid()}.part"
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, path)
        else:
            self.fs.pipe_file(path, data)

    def read_text(self, relative: str) -> str | None:
        path = self.path(relative)
        if not self.fs.exists(path):
            return None
        return self.fs.cat_file(path).decode("utf-8")


# -- the run record --------------------------------------------------------------------------


class OutputMismatchError(ValueError):
    """The output holds images another input, model or base seed made."""


def check_run_record(output: Output, record: dict) -> None:
    """Write what makes this output's images (first run), or check that a re-run makes the same ones."""
    text = output.read_text(RUN_RECORD)
    if text is None:
        output.makedirs("")
        output.write_bytes(RUN_RECORD, (json.dumps(record, indent=2) + "\n").encode())
        return
    before = json.loads(text)
    changed = [
        f"{key} was {before.get(key)!r}, now {value!r}" for key, value in record.items() if before.get(key) != value
    ]
    if changed:
        raise OutputMismatchError(
            f"{output.describe()} holds the output of another run ({'; '.join(changed)}): its finished rows "
            "would not match the new ones. Use a new output, or the same input, model and base seed."
        )


# -- reading and merging entries -------------------------------------------------------------


def manifest_file(fmt: str) -> str:
    return f"{MANIFEST_NAME}.{fmt}"


def read_entries(output: Output) -> tuple[pa.Table, list[str]]:
    """Every readable entry in the output (manifests and parts, any order), and the part files read or
    found unreadable (a merge replaces them)."""
    import pyarrow.parquet as pq

    tables, parts = [], []
    for fmt in ("parquet", "jsonl"):
        path = output.path(manifest_file(fmt))
        if output.fs.exists(path):
            tables.append(_read_manifest(output, path, fmt))
    parts_root = output.path(PARTS_DIR)
    if output.fs.exists(parts_root):
        for path in sorted(output.fs.find(parts_root)):
            parts.append(path)
            if not path.endswith(".parquet"):
                continue
            try:
                tables.append(pq.read_table(_arrow_path(output, path), filesystem=output.arrow_fs, schema=SCHEMA))
            except (OSError, pa.ArrowException) as exc:
                # A run killed while Ray Data wrote this part: its rows were not recorded, they run again.
                logger.warning("skipping unreadable manifest part %s (%s); its rows run again", path, exc)
    entries = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return entries, parts


def _arrow_path(output: Output, path: str) -> str:
    return path if output.is_local else output.fs._strip_protocol(path)


def _read_manifest(output: Output, path: str, fmt: str) -> pa.Table:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(_arrow_path(output, path), filesystem=output.arrow_fs, schema=SCHEMA)
    lines = output.fs.cat_file(path).decode("utf-8").splitlines()
    return entries_table([json.loads(line) for line in lines if line.strip()])


def entries_table(entries: list[dict]) -> pa.Table:
    """Entries (dicts with SCHEMA's names; missing ones null) as a table of SCHEMA."""
    columns = {name: [entry.get(name) for entry in entries] for name in SCHEMA.names}
    if columns["finished_at"] and isinstance(columns["finished_at"][0], str):
        columns["finished_at"] = [datetime.fromisoformat(v) if v else None for v in columns["finished_at"]]
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def merge(entries: pa.Table) -> pa.Table:
    """One entry per row, sorted by row: `done` before `failed`, then the latest."""
    if entries.num_rows == 0:
        return entries
    rows = entries.column("row").to_numpy()
    done = np.asarray(entries.column("status").to_pylist()) == DONE
    finished = entries.column("finished_at").cast(pa.int64()).fill_null(0).to_numpy()
    order = np.lexsort((-finished, ~done, rows))  # last key first: by row, then done first, then latest first
    ordered_rows = rows[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ordered_rows[1:] != ordered_rows[:-1]
    return entries.take(pa.array(order[first]))


def done_rows(entries: pa.Table) -> np.ndarray:
    """Rows some entry records as done, sorted."""
    if entries.num_rows == 0:
        return np.empty(0, dtype=np.int64)
    done = np.asarray(entries.column("status").to_pylist()) == DONE
    return np.unique(entries.column("row").to_numpy()[done])


def write_manifest(output: Output, entries: pa.Table, fmt: str, parts: list[str]) -> str:
    """Write the merged manifest (whole or not at all), then drop the parts it replaces and the
    manifest of the other format. Returns its path relative to the output."""
    import pyarrow.parquet as pq

    name = manifest_file(fmt)
    if fmt == "parquet":
        buffer = pa.BufferOutputStream()
        pq.write_table(entries, buffer)
        output.write_bytes(name, buffer.getvalue().to_pybytes())
    else:
        lines = (json.dumps(entry, ensure_ascii=False, default=_json_value) for entry in entries.to_pylist())
        output.write_bytes(name, ("\n".join(lines) + "\n").encode() if entries.num_rows else b"")
    other = output.path(manifest_file("jsonl" if fmt == "parquet" else "parquet"))
    if output.fs.exists(other):
        output.fs.rm(other)
    for path in parts:
        output.fs.rm(path)
    parts_root = output.path(PARTS_DIR)
    if output.fs.exists(parts_root) and not output.fs.find(parts_root):
        output.fs.rm(parts_root, recursive=True)
    return name


def _json_value(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")
