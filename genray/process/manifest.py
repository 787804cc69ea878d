"""The bulk-job manifest: parquet files under `<output>/_manifest/`, one row per input once compacted.

While a job runs it appends part files (so a crashed run can be resumed from what it finished); at the end the
parts are compacted into one file in which the newest row for each input wins.
"""
from __future__ import annotations

import time
import uuid
from pathlib import PurePosixPath
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from genray import storage
from genray.archives import SHARD_RE  # tar output: output_key = 'shard-000012.tar#a/b.png'

MANIFEST_DIR = "_manifest"
SCHEMA = pa.schema([
    ("input_key", pa.string()),
    ("output_key", pa.string()),
    ("status", pa.string()),  # ok | skipped | error
    ("error", pa.string()),
    ("input_etag", pa.string()),
    ("model_digest", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("seconds", pa.float64()),
    ("node_id", pa.string()),  # the Ray node whose model actor made the row (None: refused before any work)
])
COLUMNS = SCHEMA.names


def output_key_for(input_key: str, taken: set[str]) -> str:
    """a/b.jpg -> a/b.png; if another input already maps there (a/b.png beside a/b.jpg), a/b.jpg.png."""
    path = PurePosixPath(input_key)
    key = str(path.with_suffix(".png"))
    if key in taken:
        key = input_key + ".png"
    taken.add(key)
    return key


def is_done(prev: dict[str, Any] | None, etag: str, digest: str, output_key: str, tar: bool) -> bool:
    """Whether the manifest row `prev` says an input is done: ok (or skipped) with the same input ETag and model
    digest, its output where this run would put it (tar output: `output_key` inside some shard)."""
    if not prev or prev["status"] not in ("ok", "skipped") or prev["input_etag"] != etag \
            or prev["model_digest"] != digest:
        return False
    if not tar:
        return prev["output_key"] == output_key
    shard, sep, key = (prev["output_key"] or "").partition("#")
    return bool(sep) and SHARD_RE.fullmatch(shard) is not None and key == output_key


def new_run_id() -> str:
    # Sorts by time, so "newest row wins" is a sort on file names.
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"


def _file_order(name: str) -> tuple[str, int, str]:
    kind, _, rest = name.removesuffix(".parquet").partition("-")
    run_id = rest.rsplit("-", 1)[0] if kind == "part" else rest
    return (run_id, 0 if kind == "manifest" else 1, name)


def _to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = list(rows)
    return pa.table({c: [r.get(c) for r in rows] for c in COLUMNS}, schema=SCHEMA)


def _write_table(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())  # one PUT / atomic rename: never half a file


def write_part(output_uri: str, run_id: str, part: int, rows: list[dict[str, Any]]) -> None:
    if rows:
        _write_table(storage.join_uri(output_uri, MANIFEST_DIR, f"part-{run_id}-{part:05d}.parquet"), _to_table(rows))


def _manifest_files(output_uri: str) -> list[storage.ObjectInfo]:
    prefix = storage.join_uri(output_uri, MANIFEST_DIR)
    try:
        files = storage.list_objects(prefix, suffixes=(".parquet",))
    except storage.StorageError:
        return []  # no output yet (e.g. the bucket is new): nothing recorded
    return sorted((f for f in files if "/" not in f.key), key=lambda f: _file_order(f.key))


def read_manifest(output_uri: str) -> dict[str, dict[str, Any]]:
    """input_key -> the newest row recorded for it (across finished and crashed runs)."""
    latest: dict[str, dict[str, Any]] = {}
    for info in _manifest_files(output_uri):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(info.uri)), schema=SCHEMA)
        for row in table.to_pylist():
            latest[row["input_key"]] = row
    return latest


def compact(output_uri: str, run_id: str) -> str:
    """Fold every part and older manifest into `manifest-<run_id>.parquet`, then delete what it replaces."""
    old = _manifest_files(output_uri)
    rows = read_manifest(output_uri)
    uri = storage.join_uri(output_uri, MANIFEST_DIR, f"manifest-{run_id}.parquet")
    _write_table(uri, _to_table(sorted(rows.values(), key=lambda r: r["input_key"])))
    for info in old:
        if info.uri != uri:
            storage.delete(info.uri)
    return uri
