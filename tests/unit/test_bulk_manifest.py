"""The bulk output: entries merged one per row, parts of a killed run read or skipped, atomic writes,
and a re-run refused when it would make other images than the first run."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.bulk.manifest import (
    PARTS_DIR,
    SCHEMA,
    Output,
    OutputMismatchError,
    check_run_record,
    done_rows,
    entries_table,
    merge,
    read_entries,
    write_manifest,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def entry(row: int, status: str, minute: int = 0, **extra) -> dict:
    return {"row": row, "status": status, "finished_at": T0 + timedelta(minutes=minute), **extra}


def write_part(output: Output, run: str, name: str, entries: list[dict]) -> None:
    folder = output.path(f"{PARTS_DIR}/{run}")
    output.fs.makedirs(folder, exist_ok=True)
    pq.write_table(entries_table(entries), f"{folder}/{name}")


def test_merge_keeps_one_entry_per_row_done_over_failed_then_the_latest():
    entries = entries_table(
        [
            entry(2, "failed", 0, error="old"),
            entry(0, "done", 0, file="a.png"),
            entry(2, "failed", 5, error="new"),
            entry(1, "failed", 9, error="x"),
            entry(1, "done", 1, file="b.png"),
        ]
    )
    merged = merge(entries).to_pylist()
    assert [(e["row"], e["status"]) for e in merged] == [(0, "done"), (1, "done"), (2, "failed")]
    assert merged[2]["error"] == "new"
    assert list(done_rows(entries)) == [0, 1]


def test_a_killed_runs_parts_count_and_a_part_cut_short_is_skipped(tmp_path):
    output = Output(str(tmp_path))
    write_part(output, "run-1", "a.parquet", [entry(0, "done"), entry(1, "done")])
    write_part(output, "run-1", "b.parquet", [entry(2, "failed")])
    good = (tmp_path / PARTS_DIR / "run-1" / "a.parquet").read_bytes()
    (tmp_path / PARTS_DIR / "run-1" / "c.parquet").write_bytes(good[: len(good) // 2])  # killed mid-write
    entries, parts = read_entries(output)
    assert sorted(entries.column("row").to_pylist()) == [0, 1, 2]
    assert len(parts) == 3  # the unreadable one too: the merge removes it
    assert list(done_rows(entries)) == [0, 1]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_writing_the_manifest_replaces_the_parts_and_reads_back_the_same(tmp_path, fmt):
    output = Output(str(tmp_path))
    write_part(output, "run-1", "a.parquet", [entry(1, "done", files=["x.png"], warnings=[]), entry(0, "failed")])
    entries, parts = read_entries(output)
    name = write_manifest(output, merge(entries), fmt, parts)
    assert name == f"manifest.{fmt}" and not (tmp_path / PARTS_DIR).exists()
    again, parts = read_entries(output)
    assert parts == [] and again.schema == SCHEMA
    assert again.to_pylist() == merge(entries).to_pylist()
    # A later run in the other format leaves one manifest.
    write_manifest(output, again, "jsonl" if fmt == "parquet" else "parquet", [])
    assert [p.name for p in tmp_path.iterdir()] == [f"manifest.{'jsonl' if fmt == 'parquet' else 'parquet'}"]


def test_files_are_written_whole_under_their_name(tmp_path):
    output = Output(str(tmp_path))
    output.makedirs("images/0000")
    output.write_bytes("images/0000/x.png", b"data")
    assert (tmp_path / "images" / "0000" / "x.png").read_bytes() == b"data"
    assert [p.name for p in (tmp_path / "images" / "0000").iterdir()] == ["x.png"]  # no partial file left


def test_an_output_pickles_as_its_absolute_location(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    output = Output("out")
    assert output.url == str(tmp_path / "out") and output.is_local
    assert pickle.loads(pickle.dumps(output)).root == str(tmp_path / "out")
    assert Output(f"file://{tmp_path}/out").root == str(tmp_path / "out")


def test_a_rerun_must_make_the_same_images_as_the_first_run(tmp_path):
    output = Output(str(tmp_path / "out"))
    record = {"input": "/in.jsonl", "model": "synthetic:tiny", "base_seed": 0}
    check_run_record(output, record)
    check_run_record(output, dict(record))  # the same run again: fine
    with pytest.raises(OutputMismatchError, match="base_seed was 0, now 5"):
        check_run_record(output, {**record, "base_seed": 5})


def test_entries_fill_missing_columns_with_nulls():
    table = entries_table([{"row": 3, "status": "failed", "error": "e"}])
    assert table.schema == SCHEMA and table.column("file").to_pylist() == [None]
    assert entries_table([]).num_rows == 0
    assert isinstance(table, pa.Table)
