"""Archives in bulk jobs: --input resolved to loose images and archives (one archive, a prefix holding them, or a
brace pattern of shards); the Ray Data read stage that streams each archive's members into rows for the model
actors; and the driver's end: tar output shards, and archive rows recorded only after all their members.

Manifest rows of archive members have input_key 'shards/shard-000001.tar#a/b.jpg'; each archive also gets a row of
its own (input_key = the archive): ok once it was read to the end, error when it could not be. A rerun skips an
archive without opening it when that row and all its members' rows say done, or when that row says its read
workers died on it (unless --retry-errors); otherwise it reads the archive again and skips the members that are done.
"""
from __future__ import annotations

import base64
import itertools
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from genray import archives, storage
from genray.process import manifest
from genray.datasets import IMAGE_SUFFIXES

FILES_PER_UNIT = 64  # loose images travel through the read stage (when a job also has archives) in groups
STAT_THREADS = 16  # HEAD requests in flight for a brace pattern's names

# Rows of the read stage (into the model actors). An explicit schema: a block holding only error rows must agree
# with one holding image bytes.
READ_SCHEMA = pa.schema([
    ("input_key", pa.string()), ("input_uri", pa.string()), ("input_etag", pa.string()),
    ("output_key", pa.string()),
    ("input_size", pa.int64()),  # a loose file's size from the listing, checked before it is read
    ("data", pa.binary()),  # the member's bytes (None: a loose file, read by the actor)
    ("sidecars", pa.string()),  # JSON [[output name, base64 bytes], ...]: the sample's .json/.txt/... members
    ("result", pa.string()),  # JSON of a finished manifest row (skipped or error), passed through by the actors
])
# What the model actors return besides the manifest's columns: with tar output an ok row's PNG and sidecars (the
# driver writes them into shards), and for an archive's own row how many member rows it gave.
OUTPUT_SCHEMA = pa.schema(list(manifest.SCHEMA) + [
    ("data", pa.binary()), ("sidecars", pa.string()), ("num_rows", pa.int64()),
])
EXTRA_COLUMNS = ("data", "sidecars", "num_rows")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def max_member_bytes(max_pixels: int) -> int:
    """Larger members are error rows without being read: 8 bytes per allowed pixel (16-bit RGBA, uncompressed)."""
    return 8 * max_pixels + (1 << 20)


def archive_limits(cfg) -> archives.Limits:
    """A ProcessConfig's bounds on reading one archive."""
    return archives.Limits(max_member_bytes=cfg.max_input_bytes or max_member_bytes(cfg.max_pixels),
                           max_members=cfg.max_archive_members, max_bytes=cfg.max_archive_bytes,
                           max_sample_bytes=cfg.max_sample_bytes)


def _wanted(name: str, size: int) -> bool:
    """Which members' bytes a read task takes: images, and sidecars of an allowed kind within their cap."""
    return is_image(name) or (archives.is_sidecar(name) and size <= archives.SIDECAR_MAX_BYTES)


# ------------------------------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    base_uri: str  # every key below is relative to it
    images: list[storage.ObjectInfo] = field(default_factory=list)  # loose image files
    archives: list[storage.ObjectInfo] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (key, why): names of a pattern not readable


def list_inputs(input_uri: str) -> Inputs:
    """A prefix of images and/or archives, a single archive, or a brace pattern ('.../shard-{000000..000099}.tar')."""
    if archives.has_braces(input_uri):
        return _pattern_inputs(input_uri)
    if archives.is_archive(input_uri):
        try:
            info = storage.stat(input_uri)
        except storage.StorageError as err:
            if err.reason != "missing_object":
                raise
        else:  # one archive: its members' keys start with its name
            base, _, name = input_uri.rpartition("/")
            return Inputs(base or ".", archives=[replace(info, key=name)])
    objects = storage.list_objects(input_uri, suffixes=IMAGE_SUFFIXES + archives.ARCHIVE_SUFFIXES)
    # A name with a newline or a bidi override would forge lines in logs and spoof names in the manifest: refused,
    # recorded under its escaped name.
    named = [o for o in objects if not archives.has_control(o.key)]
    return Inputs(input_uri, images=[o for o in named if is_image(o.key)],
                  archives=[o for o in named if archives.is_archive(o.key)],
                  missing=[(archives.escape_control(o.key), "refused: control character in name")
                           for o in objects if archives.has_control(o.key)])


def input_root(input_uri: str) -> str:
    """The place an --input reads from: the prefix, the single archive, or a brace pattern's folder."""
    if archives.has_braces(input_uri):
        return input_uri[:input_uri.index("{")].rpartition("/")[0] or input_uri
    return input_uri


def _pattern_inputs(pattern: str) -> Inputs:
    base = pattern[:pattern.index("{")].rpartition("/")[0]
    if not base or base.endswith(":/"):
        raise storage.StorageError(f"{pattern}: put braces after a prefix, e.g. s3://bucket/shards/shard-{{0..9}}.tar")
    try:
        names = archives.expand_braces(pattern[len(base) + 1:])
    except ValueError as err:
        raise storage.StorageError(str(err)) from None

    def look_up(name: str) -> storage.ObjectInfo | str:
        if not (is_image(name) or archives.is_archive(name)):
            return f"not an image or archive ({', '.join(archives.ARCHIVE_SUFFIXES)})"
        try:
            return replace(storage.stat(f"{base}/{name}"), key=name)
        except storage.StorageError as err:
            if err.reason != "missing_object":
                raise  # a missing bucket or denied access stops the job before any work
            return "no such object (named by the input pattern)"

    inputs = Inputs(base)
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        for name, found in zip(names, pool.map(look_up, names)):
            if isinstance(found, str):
                inputs.missing.append((name, found))
            else:
                (inputs.archives if archives.is_archive(name) else inputs.images).append(found)
    return inputs


# --------------------------------------------------------------------------------------------------- plan

def error_row(input_key: str, etag: str | None, digest: str, error: str | None, status: str = "error",
              num_rows: int | None = None) -> dict[str, Any]:
    row = {"input_key": input_key, "output_key": None, "status": status, "error": error, "input_etag": etag,
           "model_digest": digest, "width": None, "height": None, "seconds": 0.0, "node_id": None}
    return row if num_rows is None else {**row, "num_rows": num_rows}


# One read unit per row: its JSON (kind 'archive' or 'files') and, for an archive, the manifest rows of its members
# done before as Arrow IPC bytes. The driver builds an archive's unit table and puts it in the object store, so it
# holds one ObjectRef per archive, never the members' rows.
UNIT_SCHEMA = pa.schema([("unit", pa.string()), ("done", pa.binary())])


@dataclass
class ArchivePlan:
    """What plan_archives found, counted: only the archives to read travel on, as unit tables."""

    units: list[Any] = field(default_factory=list)  # one-row UNIT_SCHEMA tables, as `sink` returned them
    num_skipped: int = 0  # members done before, of archives skipped whole
    num_died: int = 0  # members (and archives) recorded as "worker died while ...", of archives skipped whole
    num_archives_done: int = 0  # archives read in full before, skipped whole
    refused: list[dict[str, Any]] = field(default_factory=list)  # error rows of archives refused before any work


def plan_archives(objects: list[storage.ObjectInfo], done: pa.Table, digest: str, output_uri: str, tar: bool,
                  retry_errors: bool = False, sink=None, suffix: str = ".png") -> ArchivePlan:
    """The archives to read, and the counts of those skipped whole. `done`: the manifest's rows (all columns, sorted
    by input_key, as manifest.read_latest gives them); an archive's members are one contiguous slice of it.
    `sink(table)` takes each archive's unit table as it is made (e.g. ray.put; default: keep the table). `suffix`:
    the output format's ('.png'); an archive whose members were written in another format is read again."""
    keys = done.column("input_key").combine_chunks()
    out = ArchivePlan()
    for obj in objects:
        own_key = archives.loose_key(obj.key)
        try:  # members are written under <output>/<archive key>/...: the archive's key must stay inside
            storage.join_uri(output_uri, obj.key, "member")
        except storage.UnsafeKeyError as err:
            out.refused.append(error_row(own_key, obj.etag, digest, str(err), num_rows=0))
            continue
        # Member keys are '<own key>#<member>' and the own key holds no '#': they all lie in ['<own>#', '<own>$').
        lo = manifest.find_sorted(keys, own_key + "#")
        members = done.slice(lo, manifest.find_sorted(keys, own_key + "$") - lo)
        usable = members.filter(manifest.current_mask(members, obj.etag, digest, tar=tar) if retry_errors else
                                pc.or_(manifest.current_mask(members, obj.etag, digest, tar=tar),
                                       manifest.died_mask(members, obj.etag, digest)))
        at = manifest.find_sorted(keys, own_key)
        prev = done.slice(at, 1).to_pylist()[0] if at < len(keys) and keys[at].as_py() == own_key else None
        died = not retry_errors and manifest.died_before(prev, obj.etag, digest)
        same_format = pc.all(pc.ends_with(usable.column("output_key"), suffix)).as_py() is not False
        if died or (prev and prev["status"] in ("ok", "skipped") and prev["input_etag"] == obj.etag
                    and prev["model_digest"] == digest and usable.num_rows == members.num_rows and same_format):
            # Read to the end before and every member is done, or its read workers died: nothing to read.
            errors = pc.sum(pc.equal(usable.column("status").cast(pa.string()), "error")).as_py() or 0
            out.num_skipped += usable.num_rows - errors
            out.num_died += errors + died
            out.num_archives_done += not died
        else:
            unit = {"kind": "archive", "key": obj.key, "uri": obj.uri, "etag": obj.etag, "size": obj.size,
                    "num_done": usable.num_rows, "suffix": suffix}
            table = pa.table([[json.dumps(unit)], [encode_done(usable)]], schema=UNIT_SCHEMA)
            out.units.append(sink(table) if sink else table)
    return out


def encode_done(rows: pa.Table) -> bytes | None:
    """An archive's done member rows -> Arrow IPC bytes (None: none)."""
    if not rows.num_rows:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


def decode_done(data: bytes | None) -> dict[str, dict[str, Any]]:
    """encode_done's bytes -> input_key -> row, in the read task (one archive's members, not the job's)."""
    if not data:
        return {}
    return {row["input_key"]: row for row in pa.ipc.open_stream(data).read_all().to_pylist()}


def file_units(todo: pa.Table) -> pa.Table:
    """Ray Data map_batches (pyarrow): loose images to process (TODO_SCHEMA rows) -> read units of up to
    FILES_PER_UNIT images, for a job whose read stage also streams archives. Runs in a Ray task, not the driver."""
    rows = todo.to_pylist()
    units = [json.dumps({"kind": "files", "rows": rows[i:i + FILES_PER_UNIT]})
             for i in range(0, len(rows), FILES_PER_UNIT)]
    return pa.table([units, [None] * len(units)], schema=UNIT_SCHEMA)


# ------------------------------------------------------------------------------------- read stage (tasks)

READ_KEY = "read:"  # the AttemptTracker's keys of read units, apart from the model stage's input keys


def read_units(batch: dict[str, np.ndarray], digest: str, tar: bool, max_member_bytes: int | archives.Limits,
               rows_per_block: int, tracker=None, max_attempts: int = 3, read=None) -> Iterator[pa.Table]:
    """Ray Data map_batches generator: each unit (JSON) -> blocks of rows for the model actors. Loose images pass
    through (the actors read them); an archive is streamed member by member, `rows_per_block` rows at a time, so
    one large archive feeds every actor and is never held in memory whole. With a `tracker` (AttemptTracker), a
    unit whose read worker died `max_attempts` times gives error rows instead of another attempt. `read` stands
    in for unit_rows (tests inject faults through it)."""
    def read_unit(unit: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return (read or unit_rows)(unit, digest, tar, max_member_bytes)

    for text, done in zip(batch["unit"], batch["done"]):
        unit = json.loads(text)
        if unit["kind"] == "archive":
            unit["done"] = decode_done(done)
        if tracker is None:
            yield from _blocks(read_unit(unit), rows_per_block)
        elif unit["kind"] == "files":
            yield from _blocks(_tracked_files(unit, read_unit, digest, tracker, max_attempts), rows_per_block)
        else:
            yield from _tracked_archive(unit, read_unit, digest, rows_per_block, tracker, max_attempts)


def unit_rows(unit: dict[str, Any], digest: str, tar: bool,
              max_member_bytes: int | archives.Limits) -> Iterator[dict[str, Any]]:
    """The rows of one read unit: a loose image's row as planned (its model actor reads it), an archive's members
    one by one and then the archive's own row."""
    if unit["kind"] == "files":
        return ({**row, "data": None, "sidecars": "", "result": ""} for row in unit["rows"])
    return _archive_rows(unit, digest, tar, max_member_bytes)


def _blocks(rows: Iterator[dict[str, Any]], rows_per_block: int, giving=None) -> Iterator[pa.Table]:
    """Rows -> tables of `rows_per_block`; `giving(n)` is called before the block that makes n rows handed on."""
    block, given = [], 0
    for row in rows:
        block.append(row)
        if len(block) >= rows_per_block:
            given += len(block)
            if giving:
                giving(given)
            yield _table(block)
            block = []
    if block:
        if giving:
            giving(given + len(block))
        yield _table(block)


def _died_reading(attempts: int, max_attempts: int) -> str:
    return f"{manifest.WORKER_DIED_READING} ({attempts} attempts, limit --max-attempts {max_attempts})"


# Ray Data runs read tasks with max_retries=-1: a task whose worker died runs again, without limit (a lost node must
# not fail the job), and the tracker bounds what one unit can cost. Ray expects a retried generator task to give
# the same outputs: where the dead attempt's output at some position was taken already, the retry's is dropped. So
# a retry gives, block for block, what the dead attempt gave, and changes only what comes after: an archive's
# give-up attempt replays the rows handed on before it appends its error row; a loose-file group gives one row per
# file, in the same order, whether the file is read or refused.

def _tracked_archive(unit: dict[str, Any], read_unit, digest: str, rows_per_block: int, tracker,
                     max_attempts: int) -> Iterator[pa.Table]:
    """An archive's blocks; once `max_attempts` read workers died reading it, the rows they handed on and then the
    archive's own row as an error (the members after those are not read: reruns skip it unless --retry-errors)."""
    key = READ_KEY + archives.loose_key(unit["key"])
    prior, given = ray.get(tracker.begin_read.remote(key))
    rows = read_unit(unit)
    if prior >= max_attempts:
        rows = _replay_then_fail(unit, rows, given, digest, _died_reading(prior, max_attempts))
    yield from _blocks(rows, rows_per_block, lambda n: ray.get(tracker.gave.remote(key, n)))
    ray.get(tracker.finish.remote([key]))


def _replay_then_fail(unit: dict[str, Any], rows: Iterator[dict[str, Any]], given: int, digest: str,
                      error: str) -> Iterator[dict[str, Any]]:
    last = None
    for last in itertools.islice(rows, given):  # read without a death before: they were handed on
        yield last
    if last is None or last["input_key"] != archives.loose_key(unit["key"]):  # not read to its end
        yield _archive_row(unit, digest, error, num_rows=given)


def _tracked_files(unit: dict[str, Any], read_unit, digest: str, tracker,
                   max_attempts: int) -> Iterator[dict[str, Any]]:
    """A group of loose files' rows; a group a dead worker had begun is read one file at a time, so only the file
    that kills is blamed, and after `max_attempts` deaths it is an error row (as the model stage does a batch)."""
    keys = [READ_KEY + row["input_key"] for row in unit["rows"]]
    if not ray.get(tracker.begin_batch.remote(keys)):
        yield from read_unit(unit)
        ray.get(tracker.finish.remote(keys))
        return
    for row, key in zip(unit["rows"], keys):
        prior = ray.get(tracker.begin.remote(key))
        if prior >= max_attempts:
            got = [{**row, "data": None, "sidecars": "", "result": json.dumps(
                error_row(row["input_key"], row["input_etag"], digest, _died_reading(prior, max_attempts)))}]
        else:
            got = list(read_unit({"kind": "files", "rows": [row]}))
        ray.get(tracker.finish.remote([key]))  # read: a death from here on is not this file's
        yield from got


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def _archive_rows(unit: dict[str, Any], digest: str, tar: bool,
                  max_member_bytes: int | archives.Limits) -> Iterator[dict[str, Any]]:
    key, etag, done = unit["key"], unit["etag"], unit["done"]
    taken: set[str] = set()
    seen: Counter = Counter()
    error = None
    limits = max_member_bytes if isinstance(max_member_bytes, archives.Limits) else archives.Limits(max_member_bytes)
    members = archives.read_members(unit["uri"], limits, size=unit["size"], etag=etag, wanted=_wanted)
    try:
        for member, sidecars in archives.group_samples(members, is_image, limits.max_sample_bytes):
            # A name repeated in a tar (an appended update): one row each, never one dropped silently. The n-th
            # entry of a name is 'name#n' in the manifest (and gets the next free output key).
            seen[member.name] += 1
            name = member.name
            if seen[member.name] > 1:
                n = seen[member.name]
                while seen[f"{member.name}#{n}"]:
                    n += 1
                name = f"{member.name}#{n}"
                seen[name] += 1
            input_key = archives.member_key(key, name)
            row = {"input_key": input_key, "input_uri": f"{unit['uri']}#{name}", "input_etag": etag,
                   "output_key": None, "data": None, "sidecars": "", "result": ""}
            if member.error is not None:
                yield {**row, "result": json.dumps(error_row(input_key, etag, digest, member.error))}
                continue
            out_key = manifest.member_output_key(key, member.name, taken, unit.get("suffix", ".png"))
            prev = done.get(input_key)
            if manifest.is_done(prev, etag, digest, out_key, tar):
                yield {**row, "result": json.dumps({**prev, "status": "skipped", "error": None, "seconds": 0.0})}
            elif manifest.died_before(prev, etag, digest):  # in `done` only without --retry-errors
                yield {**row, "result": json.dumps({**prev, "seconds": 0.0})}
            else:
                sidecar_names = [manifest.sidecar_output_key(out_key, key, s.name) for s in sidecars]
                yield {**row, "output_key": out_key, "data": member.data,
                       "sidecars": encode_sidecars(list(zip(sidecar_names, (s.data for s in sidecars))))}
    except archives.ArchiveError as err:
        error = str(err)
    # The archive's own row, last: how many member rows it gave, so the driver can hold it back until they are in.
    yield _archive_row(unit, digest, error, num_rows=sum(seen.values()))


def _archive_row(unit: dict[str, Any], digest: str, error: str | None, num_rows: int) -> dict[str, Any]:
    key = archives.loose_key(unit["key"])
    return {"input_key": key, "input_uri": unit["uri"], "input_etag": unit["etag"], "output_key": None, "data": None,
            "sidecars": "", "result": json.dumps(error_row(key, unit["etag"], digest, error, "error" if error else "ok",
                                                           num_rows=num_rows))}


def encode_sidecars(files: list[tuple[str, bytes]]) -> str:
    return json.dumps([[name, base64.b64encode(data).decode()] for name, data in files]) if files else ""


def decode_sidecars(text: str | None) -> list[tuple[str, bytes]]:
    return [(name, base64.b64decode(data)) for name, data in json.loads(text)] if text else []


# ------------------------------------------------------------------------------------- model actors' side

def passed_through(result: str) -> dict[str, Any]:
    """A finished row from the read stage (skipped member, refused or unreadable entry, an archive's own row)."""
    row = json.loads(result)
    return {**row, "data": None, "sidecars": None, "num_rows": row.get("num_rows")}


def output_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{**{c: None for c in EXTRA_COLUMNS}, **row} for row in rows], schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------------------------------- driver's side

class DriverRows:
    """Rows as the model actors return them -> manifest rows, released in an order a crash cannot get wrong:
    with tar output an ok row only once the shard holding its output is committed (a shard is written once, whole;
    the one being filled when the job dies is never written, and its images are redone by the rerun); an archive's
    own row only after all its member rows (so 'read in full' in the manifest means every member is recorded)."""

    def __init__(self, output_uri: str, tar: bool, shard_size: int, shard_bytes: int | None, before_commit=None):
        """`before_commit()`: run before each shard is written (the lease check, see ShardWriter)."""
        self.writer = archives.ShardWriter(output_uri, shard_size, shard_bytes,
                                           before_commit=before_commit) if tar else None
        self.held: dict[str, dict[str, Any]] = {}  # archive key -> its row, until its members are released
        self.released: Counter = Counter()  # archive key -> member rows released
        self.shards_committed = 0

    def add(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Returns the rows now ready for the manifest (row dicts; an archive's own row has `num_rows`)."""
        data, sidecars = row.pop("data", None), row.pop("sidecars", None)
        if self.writer is None or row["status"] != "ok" or data is None:
            return self._release([row])
        files = [(row["output_key"], data)] + decode_sidecars(sidecars)
        return self._release(self._committed(self.writer.add(files, row)))

    def close(self) -> list[dict[str, Any]]:
        """The last shard; archive rows still held (their members never all came back) are dropped: the archive is
        read again next time."""
        return self._release(self._committed(self.writer.close())) if self.writer else []

    def abort(self) -> None:
        if self.writer:
            self.writer.abort()

    def _committed(self, pairs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        self.shards_committed += len({shard for shard, _ in pairs})
        return [{**row, "output_key": f"{shard}#{row['output_key']}"} for shard, row in pairs]

    def _release(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ready = []
        for row in rows:
            if row.get("num_rows") is not None:
                self.held[row["input_key"]] = row
                continue
            ready.append(row)
            split = archives.split_member_key(row["input_key"])
            if split:
                self.released[archives.loose_key(split[0])] += 1
        for key in [k for k, r in self.held.items() if self.released[k] >= r["num_rows"]]:
            ready.append(self.held.pop(key))
        return ready
