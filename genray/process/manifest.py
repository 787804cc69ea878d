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
from genray.archives import ARCHIVE_SUFFIXES, SHARD_RE  # tar output: output_key = 'shard-000012.tar#a/b.png'

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
# The error of an input whose model worker died on it --max-attempts times: reruns skip it unless --retry-errors.
WORKER_DIED = "worker died while processing it"


# A folder whose name ends like an archive ('a.tar/') gets this mark in output keys, as does a folder already
# ending with it: then only an archive's members are written under '<archive key>/', never a loose file.
FOLDER_MARK = "~"


def _mark_folder(segment: str) -> str:
    return segment + FOLDER_MARK if segment.lower().endswith(ARCHIVE_SUFFIXES + (FOLDER_MARK,)) else segment


def _folders(key: str) -> str:
    """'x/a.tar/b.png' -> 'x/a.tar~/b.png': every folder segment marked as _mark_folder says (injective)."""
    *folders, name = key.split("/")
    return "/".join([_mark_folder(f) for f in folders] + [name])


def _candidates(key: str):
    """a/b.jpg -> a/b.png, then a/b.jpg.png, then a/b.jpg~2.png, a/b.jpg~3.png, ..."""
    yield str(PurePosixPath(key).with_suffix(".png")) if PurePosixPath(key).suffix else key + ".png"
    yield key + ".png"
    n = 2
    while True:
        yield f"{key}~{n}.png"
        n += 1


def output_key_for(input_key: str, taken: set[str]) -> str:
    """A loose file's output key: a/b.jpg -> a/b.png; if an earlier input took that (a/b.png beside a/b.jpg),
    a/b.jpg.png, then a/b.jpg~2.png, ... until free: within `taken` (one listing) every input gets its own key.
    Folders named like archives are marked (x.tar/ -> x.tar~/) so no loose file lands where an archive's members
    go (member_output_key)."""
    for key in _candidates(_folders(input_key)):
        if key not in taken:
            taken.add(key)
            return key


def member_output_key(archive_key: str, member: str, taken: set[str]) -> str:
    """An archive member's output key: '<archive key>/<member as output_key_for>' (the archive's own folders
    marked, its name not), unique within `taken` (one archive). Two archives, and loose files, never meet: the
    first unmarked archive-like folder of an output key names the one archive it came from."""
    *folders, name = archive_key.split("/")
    base = "/".join([_mark_folder(f) for f in folders] + [name])
    for key in _candidates(member):
        if f"{base}/{key}" not in taken:
            taken.add(f"{base}/{key}")
            return f"{base}/{key}"


def sidecar_output_key(member_output: str, archive_key: str, sidecar: str) -> str:
    """Where a sidecar of a member goes: beside its image's output, in the same (marked) archive folder."""
    depth = len(archive_key.split("/"))
    base = "/".join(member_output.split("/")[:depth])
    return f"{base}/{sidecar}"


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


def died_before(prev: dict[str, Any] | None, etag: str, digest: str) -> bool:
    """Whether `prev` records that this input (same ETag, same model) killed its workers: reruns skip it."""
    return bool(prev) and prev["status"] == "error" and (prev["error"] or "").startswith(WORKER_DIED) \
        and prev["input_etag"] == etag and prev["model_digest"] == digest


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
