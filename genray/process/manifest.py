"""The bulk-job manifest: parquet files under `<output>/_manifest/`, one row per input once compacted.

While a job runs it appends part files (so a crashed run can be resumed from what it finished). At the end the
parts are folded into segments (`manifest-<run_id>-NNNN.parquet`, sorted by input_key, at most SEGMENT_ROWS rows
each) so that no input has a row in two files: `pyarrow.dataset.dataset(<output>/_manifest)` reads one row per
input. Folding rewrites only the older segments that hold an input the run recorded again, and merges small
segments once there are many, so a rerun that adds ten rows to a ten-million-row manifest writes ten rows, not ten
million. genray's own reader does not depend on that: the newest row for each input wins (files sort by run id).
A part that cannot be read is moved to `_manifest/_quarantine/` (pyarrow.dataset skips `_` names): the inputs it
covered have no row, so the next run does them again.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genray import storage
from genray.archives import ARCHIVE_SUFFIXES, SHARD_RE  # tar output: output_key = 'shard-000012.tar#a/b.png'

MANIFEST_DIR = "_manifest"
QUARANTINE_DIR = "_quarantine"  # under MANIFEST_DIR; a leading '_' keeps pyarrow.dataset from reading it
SEGMENT_ROWS = 250_000  # rows per compacted file at most: re-recording one input rewrites at most this many rows
SMALL_SEGMENT_ROWS = 20_000  # segments below this are merged once there are more than MAX_SMALL_SEGMENTS of them
MAX_SMALL_SEGMENTS = 8
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
# The error of an input whose model worker (or, for an archive or loose file, read worker) died on it --max-attempts
# times: reruns skip it unless --retry-errors.
WORKER_DIED = "worker died while processing it"
WORKER_DIED_READING = "worker died while reading it"
DIED = (WORKER_DIED, WORKER_DIED_READING)


# A folder whose name ends like an archive ('a.tar/') gets this mark in output keys, as does a folder already
# ending with it: then only an archive's members are written under '<archive key>/', never a loose file.
FOLDER_MARK = "~"


# Segments that storage.join_uri drops ('' from '//' or a leading '/', and '.'): an output key keeps them as '~' and
# '.~', so 'a/./b.png', 'a//b.png' and 'a/b.png' (three S3 objects) get three outputs. A '..' segment stays as it
# is: join_uri refuses it, so an input whose key names a parent folder gets an error row, never an output.
_VANISHING = ("", ".")


def _mark_folder(segment: str) -> str:
    marked = segment in _VANISHING or segment.lower().endswith(ARCHIVE_SUFFIXES + (FOLDER_MARK,))
    return segment + FOLDER_MARK if marked else segment


def _folders(key: str) -> str:
    """'x/a.tar/b.png' -> 'x/a.tar~/b.png': every folder segment marked as _mark_folder says, and a name that
    would vanish from a path ('', '.') marked the same way (injective: a real 'b~' becomes 'b~~')."""
    if "/" not in key and key not in _VANISHING:
        return key
    *folders, name = key.split("/")
    name = name + FOLDER_MARK if name in _VANISHING else name
    return "/".join([_mark_folder(f) for f in folders] + [name])


def _candidates(key: str, suffix: str):
    """a/b.jpg -> a/b.png, then a/b.jpg.png, then a/b.jpg~2.png, a/b.jpg~3.png, ... (suffix '.png')"""
    yield with_suffix(key, suffix)
    yield key + suffix
    n = 2
    while True:
        yield f"{key}~{n}{suffix}"
        n += 1


def output_key_for(input_key: str, taken: set[str], suffix: str = ".png") -> str:
    """A loose file's output key: a/b.jpg -> a/b.png (`suffix`: the output format's); if an earlier input took that
    (a/b.png beside a/b.jpg), a/b.jpg.png, then a/b.jpg~2.png, ... until free: within `taken` (one listing) every
    input gets its own key. Folders named like archives are marked (x.tar/ -> x.tar~/) so no loose file lands where
    an archive's members go (member_output_key)."""
    for key in _candidates(_folders(input_key), suffix):
        if key not in taken:
            taken.add(key)
            return key


def member_output_key(archive_key: str, member: str, taken: set[str], suffix: str = ".png") -> str:
    """An archive member's output key: '<archive key>/<member as output_key_for>' (the archive's own folders
    marked, its name not), unique within `taken` (one archive). Two archives, and loose files, never meet: the
    first unmarked archive-like folder of an output key names the one archive it came from."""
    *folders, name = archive_key.split("/")
    base = "/".join([_mark_folder(f) for f in folders] + [name])
    for key in _candidates(member, suffix):
        if f"{base}/{key}" not in taken:
            taken.add(f"{base}/{key}")
            return f"{base}/{key}"


def sidecar_output_key(member_output: str, archive_key: str, sidecar: str) -> str:
    """Where a sidecar of a member goes: beside its image's output, in the same (marked) archive folder."""
    depth = len(archive_key.split("/"))
    base = "/".join(member_output.split("/")[:depth])
    return f"{base}/{sidecar}"


def with_suffix(key: str, suffix: str) -> str:
    """str(PurePosixPath(key).with_suffix(suffix)), without building a path for a plain key (planning calls this
    once per input; pathlib costs several times the listing's own work per key)."""
    name = key[key.rfind("/") + 1:]
    plain = name not in ("", ".", "..") and "//" not in key and not key.startswith(("/", "./")) \
        and "/./" not in key and not key.endswith("/.")
    if not plain:
        return str(PurePosixPath(key).with_suffix(suffix))
    dot = name.rfind(".")
    return (key[:len(key) - len(name) + dot] if 0 < dot < len(name) - 1 else key) + suffix


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
    return bool(prev) and prev["status"] == "error" and (prev["error"] or "").startswith(DIED) \
        and prev["input_etag"] == etag and prev["model_digest"] == digest


# The same tests over Arrow columns (planning diffs whole pages and archives at once, never a dict per row). `etag`:
# a scalar or an array aligned with `rows`; nulls count as "no".

def current_mask(rows: pa.Table, etag, digest: str, tar: bool | None = None) -> pa.ChunkedArray:
    """is_done short of the output key: ok (or skipped) with this input ETag and model digest; with `tar` given,
    also its output inside a shard if and only if tar (how an archive's members are checked)."""
    status = rows.column("status").cast(pa.string())
    mask = pc.and_kleene(pc.is_in(status, value_set=pa.array(["ok", "skipped"])),
                         pc.equal(rows.column("input_etag"), etag))
    mask = pc.and_kleene(mask, pc.equal(rows.column("model_digest").cast(pa.string()), pa.scalar(digest)))
    if tar is not None:
        shard = pc.fill_null(pc.match_substring_regex(rows.column("output_key"), "^" + SHARD_RE.pattern), False)
        mask = pc.and_kleene(mask, pc.equal(shard, pa.scalar(tar)))
    return pc.fill_null(mask, False)


def died_mask(rows: pa.Table, etag, digest: str) -> pa.ChunkedArray:
    """died_before over Arrow columns."""
    error = rows.column("error").cast(pa.string())
    mask = pc.and_kleene(pc.equal(rows.column("status").cast(pa.string()), pa.scalar("error")),
                         pc.or_kleene(*[pc.starts_with(error, prefix) for prefix in DIED]))
    mask = pc.and_kleene(mask, pc.equal(rows.column("input_etag"), etag))
    return pc.fill_null(pc.and_kleene(mask, pc.equal(rows.column("model_digest").cast(pa.string()),
                                                     pa.scalar(digest))), False)


def new_run_id() -> str:
    # Sorts by time, so "newest row wins" is a sort on file names.
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"


def _file_order(name: str) -> tuple[str, int, str]:
    # manifest-<run_id>[-NNNN].parquet and part-<run_id>-NNNNN.parquet; run_id = <20 digits>-<6 hex>.
    kind, _, rest = name.removesuffix(".parquet").partition("-")
    run_id = "-".join(rest.split("-")[:2])
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


def manifest_uri(output_uri: str) -> str:
    """What users open with pyarrow.dataset: the folder of segments."""
    return storage.join_uri(output_uri, MANIFEST_DIR) + "/"


def _manifest_files(output_uri: str) -> list[storage.ObjectInfo]:
    prefix = storage.join_uri(output_uri, MANIFEST_DIR)
    try:
        files = storage.list_objects(prefix, suffixes=(".parquet",))
    except storage.StorageError:
        return []  # no output yet (e.g. the bucket is new): nothing recorded
    return sorted((f for f in files if "/" not in f.key), key=lambda f: _file_order(f.key))


# ------------------------------------------------------------------------------------------------- reading

# Columns of a handful of distinct values: read dictionary-encoded, so a million rows cost a million small indices.
_DICTIONARY_COLUMNS = ["status", "model_digest", "node_id"]


def _read_file(info: storage.ObjectInfo, columns: list[str] | None = None) -> pa.Table:
    """One manifest file (ArrowInvalid/OSError if it is not a readable manifest part)."""
    data = storage.read_bytes(info.uri)
    if not data:
        raise pa.ArrowInvalid("empty file")
    # ParquetFile, not pq.read_table: the latter imports pyarrow.dataset and with it pandas (seconds, ~50 MB).
    table = pq.ParquetFile(pa.BufferReader(data), read_dictionary=[
        c for c in _DICTIONARY_COLUMNS if columns is None or c in columns]).read(columns=columns)
    missing = [c for c in (columns or COLUMNS) if c not in table.column_names]
    if missing:
        raise pa.ArrowInvalid(f"no column {', '.join(missing)}")
    return table


def quarantine(info: storage.ObjectInfo, output_uri: str) -> str:
    """Move an unreadable manifest file aside (kept for a post-mortem); returns where it went."""
    dest = storage.join_uri(output_uri, MANIFEST_DIR, QUARANTINE_DIR, info.key)
    storage.write_bytes(dest, storage.read_bytes(info.uri))
    storage.delete(info.uri)
    return dest


@dataclass
class Segment:
    """A manifest file as the reader saw it: its rows' key range lets compaction skip files a run did not touch."""

    info: storage.ObjectInfo
    num_rows: int
    min_key: str | None
    max_key: str | None


def read_latest(output_uri: str, columns: list[str] | None = None, quarantine_bad: bool = True,
                log: Callable[[str], None] = print) -> pa.Table:
    """The newest row of every input recorded under output_uri, sorted by input_key, as one Arrow table of
    `columns` (input_key always first). Held as Arrow, never as a dict per row: a million rows of the planning
    columns take about 100 MB. A file that cannot be read is quarantined (or, with quarantine_bad=False, e.g. for a
    dry run, only reported) and the inputs it covered count as not done."""
    columns = ["input_key"] + [c for c in (columns or COLUMNS) if c != "input_key"]
    tables = []
    for info in _manifest_files(output_uri):
        try:
            tables.append(_read_file(info, columns))
        except (pa.ArrowInvalid, OSError) as err:
            _report(info, err, quarantine(info, output_uri) if quarantine_bad else "nowhere yet (dry run)", log)
    return _newest(tables) if tables else _empty(columns)


def _empty(columns: list[str]) -> pa.Table:
    return pa.schema([SCHEMA.field(c) for c in columns]).empty_table()


def read_manifest(output_uri: str) -> dict[str, dict[str, Any]]:
    """input_key -> the newest row recorded for it. A dict per row: for small manifests and tests only; planning
    reads read_latest's Arrow table."""
    return {row["input_key"]: row for row in read_latest(output_uri, log=lambda _: None).to_pylist()}


def sample_rows(output_uri: str, n: int, status: str = "ok") -> list[dict[str, Any]]:
    """Up to n recorded rows with `status`, reading manifest files one at a time and stopping early: a preview
    (the pipeline report's before/after crops) that costs one file, not the whole manifest."""
    rows: list[dict[str, Any]] = []
    for info in _manifest_files(output_uri):
        try:
            table = _read_file(info, ["input_key", "output_key", "status"])
        except (pa.ArrowInvalid, OSError):
            continue
        rows += table.filter(pc.equal(table["status"], status)).slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return rows


def find_sorted(keys: pa.Array, key: str, side: str = "left") -> int:
    """bisect on a sorted Arrow string array (a page's range in the manifest, without a Python list of keys)."""
    lo, hi = 0, len(keys)
    while lo < hi:
        mid = (lo + hi) // 2
        k = keys[mid].as_py()
        if k < key or (side == "right" and k == key):
            lo = mid + 1
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------------------ compaction

def compact(output_uri: str, run_id: str, log: Callable[[str], None] = print) -> str:
    """Fold the part files into segments so that every input has one row in one file (see the module docstring);
    returns the manifest folder's URI. Crash-safe in this order: new segments are written before older segments
    drop the rows they supersede and before the parts go, and the reader lets the newest file win meanwhile."""
    files = _manifest_files(output_uri)
    parts = [f for f in files if f.key.startswith("part-")]
    segments = [f for f in files if f.key.startswith("manifest-")]
    new = _read_parts(parts, output_uri, log)
    written: list[Segment] = []
    if new.num_rows:
        new_keys = new.column("input_key")
        # [1] the run's rows as new sorted segments
        for i, start in enumerate(range(0, new.num_rows, SEGMENT_ROWS)):
            chunk = new.slice(start, SEGMENT_ROWS)
            uri = storage.join_uri(output_uri, MANIFEST_DIR, f"manifest-{run_id}-{i:04d}.parquet")
            _write_table(uri, chunk)
            written.append(Segment(storage.ObjectInfo(uri.rsplit("/", 1)[1], uri, 0, ""), chunk.num_rows,
                                   chunk.column("input_key")[0].as_py(), chunk.column("input_key")[-1].as_py()))
        # [2] older segments drop the rows the run recorded again: only those whose key range holds one are read
        kept = []
        for info in segments:
            seg = _segment(info)
            if seg is None:
                continue  # unreadable: quarantined by the next read (its inputs are redone)
            if seg.min_key is not None and not _overlaps(new_keys, seg.min_key, seg.max_key):
                kept.append(seg)
                continue
            table = _read_file(info)
            stale = pc.is_in(table.column("input_key"), value_set=new_keys)
            if not pc.any(stale).as_py():
                kept.append(seg)
                continue
            table = table.filter(pc.invert(stale))
            if table.num_rows:
                _write_table(info.uri, table)  # in place: one PUT / atomic rename
                kept.append(Segment(info, table.num_rows, seg.min_key, seg.max_key))
            else:
                storage.delete(info.uri)
        segments_now = kept + written
    else:
        segments_now = [s for s in (_segment(info) for info in segments) if s is not None]
    # [3] many small segments (reruns that each added a few rows) become one
    small = [s for s in segments_now if s.num_rows < SMALL_SEGMENT_ROWS]
    if len(small) > MAX_SMALL_SEGMENTS:
        merged = pa.concat_tables([_read_file(s.info) for s in small])
        merged = merged.take(pc.sort_indices(merged, [("input_key", "ascending")]))
        uri = storage.join_uri(output_uri, MANIFEST_DIR, f"manifest-{run_id}-merged.parquet")
        _write_table(uri, merged)
        for s in small:
            if s.info.uri != uri:
                storage.delete(s.info.uri)
    # [4] the parts are folded in
    for info in parts:
        storage.delete(info.uri)
    return manifest_uri(output_uri)


def _read_parts(parts: list[storage.ObjectInfo], output_uri: str, log) -> pa.Table:
    """The parts' rows, newest per input, sorted by input_key (an unreadable part is quarantined)."""
    tables = []
    for info in parts:
        try:
            tables.append(_read_file(info).cast(SCHEMA))
        except (pa.ArrowInvalid, OSError) as err:
            _report(info, err, quarantine(info, output_uri), log)
    return _newest(tables) if tables else SCHEMA.empty_table()


def _report(info: storage.ObjectInfo, err: Exception, where: str, log) -> None:
    log(f"[genray] manifest file {info.uri} cannot be read ({str(err).splitlines()[0][:200]}): quarantined to "
        f"{where}; the inputs it recorded will be processed again")


def _newest(tables: list[pa.Table]) -> pa.Table:
    """Tables in file order (oldest first) -> one table sorted by input_key with the newest row of each key."""
    table = pa.concat_tables(tables, promote_options="permissive")
    keys = table.column("input_key")
    if table.num_rows < 2 or pc.all(pc.greater(keys.slice(1), keys.slice(0, table.num_rows - 1))).as_py():
        return table  # sorted with one row per key already (one compacted file): no sorted copy of it all
    orders = [np.full(t.num_rows, i, np.int32) for i, t in enumerate(tables)]
    table = table.append_column("_order", pa.chunked_array([pa.array(o) for o in orders], pa.int32()))
    del tables, orders
    table = table.take(pc.sort_indices(table, [("input_key", "ascending"), ("_order", "descending")]))
    keys = table.column("input_key")
    if table.num_rows > 1:
        first = pc.not_equal(keys.slice(1), keys.slice(0, table.num_rows - 1)).combine_chunks()
        if pc.sum(pc.invert(first)).as_py():  # some key has rows in two files
            table = table.filter(pa.concat_arrays([pa.array([True]), first]))
    return table.drop_columns(["_order"])


def _segment(info: storage.ObjectInfo) -> Segment | None:
    """A segment's row count and key range from its parquet footer alone (row-group statistics)."""
    try:
        with storage.open_read(info.uri, info.size, info.etag, buffer_bytes=1 << 20) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError):
        return None
    lo = hi = None
    col = meta.schema.names.index("input_key") if "input_key" in meta.schema.names else None
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(col).statistics if col is not None else None
        if stats is None or not stats.has_min_max:
            return Segment(info, meta.num_rows, None, None)  # unknown range: compaction reads its keys
        lo = stats.min if lo is None or stats.min < lo else lo
        hi = stats.max if hi is None or stats.max > hi else hi
    return Segment(info, meta.num_rows, lo, hi)


def _overlaps(sorted_keys: pa.ChunkedArray | pa.Array, lo: str, hi: str) -> bool:
    """Whether any of sorted_keys lies in [lo, hi]."""
    keys = sorted_keys.combine_chunks() if isinstance(sorted_keys, pa.ChunkedArray) else sorted_keys
    i = find_sorted(keys, lo)
    return i < len(keys) and keys[i].as_py() <= hi
