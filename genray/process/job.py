"""`genray process`: a Ray Data job that runs a model artefact over every image under a prefix.

list -> skip what the manifest says is done -> (Ray Data) read + decode + Predictor + encode + write in model
actors -> manifest rows streamed back to the driver and flushed as parquet parts -> compacted manifest.
A bad input becomes an `error` row; it never stops the job.
"""
from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image
from ray.util.annotations import RayDeprecationWarning
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from genray import archives, logs, storage
from genray.datasets import IMAGE_SUFFIXES
from genray.model_artifact import ArtifactError, provenance, read_meta
from genray.process import read_stage
from genray.process import manifest
from genray.process.attempts import AttemptTracker
from genray.process.lease import Lease, LeaseError, lost_lease
from genray.config import ProcessConfig
from genray.images import ImageError, decode_image, encode_image, resize
from genray.runtime import ray_error_line

FLUSH_ROWS = 500  # manifest part size ...
FLUSH_SECONDS = 30.0  # ... or age, whichever comes first: bounds what a crash can lose
PROGRESS_SECONDS = 10.0  # a progress line at most this often
IO_THREADS = 8  # per model actor: the reads (and writes) of one batch in flight at once
ACTOR_START_TIMEOUT_S = 600


class JobError(RuntimeError):
    """The job as a whole cannot run (bad model, unreadable input prefix, ...)."""


@dataclass
class JobSummary:
    run_id: str
    counts: Counter = field(default_factory=lambda: Counter(ok=0, skipped=0, error=0))
    seconds: float = 0.0
    manifest_uri: str = ""
    errors: list[tuple[str, str]] = field(default_factory=list)  # (input_key, reason), first few

    @property
    def images_per_s(self) -> float:
        return self.counts["ok"] / self.seconds if self.seconds > 0 else 0.0

    def record(self, row: dict[str, Any]) -> bool:
        """Count a manifest row; False (not counted) for an archive's own row unless it is an error."""
        if row.get("num_rows") is not None and row["status"] != "error":
            return False
        self.counts[row["status"]] += 1
        if row["status"] == "error" and len(self.errors) < 10:
            self.errors.append((row["input_key"], row["error"]))
        return True

    def table(self) -> str:
        lines = [f"{'status':<8} {'count':>7}"] + [f"{s:<8} {self.counts[s]:>7}" for s in ("ok", "skipped", "error")]
        lines.append(f"{self.counts['ok']} images in {self.seconds:.1f}s ({self.images_per_s:.2f} images/s)")
        lines += [f"error: {k}: {why}" for k, why in self.errors]
        return "\n".join(lines)


def check_model(cfg: ProcessConfig) -> dict[str, Any]:
    """The model's model.json (or, for a Gatys style job, its recipe), checked against the task before any work."""
    if cfg.model_uri is None:  # style job with a style image: Gatys optimisation, no artefact
        from genray.process.gatys import GatysStylizer, StyleImageError
        from genray.models.vgg import VGGWeightsError

        try:
            return {"task": "style", "family": "gatys", "digest": GatysStylizer(cfg, log=lambda _: None).digest}
        except (StyleImageError, VGGWeightsError) as err:
            raise JobError(str(err)) from None
    try:
        meta = read_meta(cfg.model_uri)
    except ArtifactError as err:
        raise JobError(str(err)) from None
    if meta.get("task") != cfg.task:
        raise JobError(f"{cfg.model_uri}: a {meta.get('family')} model does {meta.get('task')!r}, "
                       f"not {cfg.task!r}; pass a {cfg.task} model artefact")
    return meta


@dataclass
class Plan:
    """What a run does, counted rather than listed: the loose images to process travel as Arrow blocks (in Ray's
    object store, or handed to the dry run's log), so the driver never holds a row per input."""

    todo: list[Any] = field(default_factory=list)  # ObjectRefs of Arrow tables (TODO_SCHEMA), one per block
    num_todo: int = 0
    num_skipped: int = 0  # images the manifest has done with this model and input ETag
    refused: list[dict[str, Any]] = field(default_factory=list)  # error rows before any work
    units: list[Any] = field(default_factory=list)  # archives to read: ObjectRefs of one-row UNIT_SCHEMA tables
    num_archives_done: int = 0  # archives read in full before (their members are in num_skipped)
    num_died: int = 0  # inputs (and archives) recorded as "worker died while ...", not retried (--retry-errors)


TODO_SCHEMA = pa.schema([("input_key", pa.string()), ("input_uri", pa.string()), ("input_etag", pa.string()),
                         ("output_key", pa.string()),
                         ("input_size", pa.int64())])  # from the listing: checked against --max-input-bytes
# What a rerun's diff reads ('error': to skip inputs that killed their workers).
PLAN_COLUMNS = ["input_key", "output_key", "status", "input_etag", "model_digest", "error"]
BLOCK_BATCHES = 4  # a block of the to-do dataset holds this many batches: small enough to spread a short job
VERIFY_THREADS = 16  # --verify-outputs: HEAD requests in flight
_TAR_OUTPUT = r"^shard-\d{6,}\.tar#"  # manifest.SHARD_RE, anchored, and the '#' before the member's key


def plan(cfg: ProcessConfig, digest: str, sink=None, log=print, unit_sink=None) -> Plan:
    """List the inputs page by page and diff each page against the manifest (Arrow, sorted by key) as it comes:
    memory is the manifest's planning columns plus a page, and time is linear in inputs + manifest rows.
    `sink(table)` receives each block of loose images to process and `unit_sink(table)` each archive to read
    (read_stage.UNIT_SCHEMA); the defaults keep the tables (tests, the dry run)."""
    tar = cfg.output_format == "tar"
    sink = sink or (lambda table: table)
    unit_sink = unit_sink or (lambda table: table)
    work = Plan()
    done = manifest.read_latest(cfg.output_uri, PLAN_COLUMNS, quarantine_bad=not cfg.dry_run, log=log)
    done_keys = done.column("input_key").combine_chunks()
    try:
        base_uri, pages, missing = _input_pages(cfg.input_uri)
        out_rel = _nested_prefix(base_uri, cfg.output_uri)
        out_keys = _OutputKeys(cfg.output_suffix)
        archive_objs: list[storage.ObjectInfo] = []
        block: list[pa.Table] = []
        block_rows, target = 0, BLOCK_BATCHES * cfg.batch_size
        for page in pages:
            if out_rel:  # never eat our own outputs
                page = [obj for obj in page if not obj.key.startswith(out_rel)]
            # Per page with Arrow where it can (keys are checked a million times a run): Python per key only for
            # names that need it.
            names = [obj.key for obj in page]
            keys = pa.array(names, pa.string())
            if not pc.all(pc.ascii_is_printable(keys)).as_py() \
                    and any(archives.has_control(obj.key) for obj in page):
                # A newline or a bidi override in a name would forge log lines and spoof manifest keys: refused,
                # recorded under the escaped name.
                work.refused += [read_stage.error_row(archives.escape_control(obj.key), obj.etag, digest,
                                                      "refused: control character in name")
                                 for obj in page if archives.has_control(obj.key)]
                page = [obj for obj in page if not archives.has_control(obj.key)]
                names = [obj.key for obj in page]
                keys = pa.array(names, pa.string())
            is_image = pc.match_substring_regex(keys, _IMAGE)
            images = page
            if not pc.all(is_image).as_py():  # the listing holds only images and archives
                flags = is_image.to_pylist()
                images = [obj for obj, image in zip(page, flags) if image]
                archive_objs += [obj for obj, image in zip(page, flags) if not image]
                names, keys = [obj.key for obj in images], keys.filter(is_image)
            if not images:
                continue
            todo = _diff_page(cfg, digest, tar, images, names, keys, out_keys, done, done_keys, work)
            if todo.num_rows:
                work.num_todo += todo.num_rows
                block.append(todo)
                block_rows += todo.num_rows
                while block_rows >= target:
                    table = pa.concat_tables(block)
                    work.todo.append(sink(table.slice(0, target)))
                    rest = table.slice(target)
                    block, block_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if block_rows:
            work.todo.append(sink(pa.concat_tables(block)))
    except storage.StorageError as err:
        raise JobError(str(err)) from None
    del done, done_keys
    work.refused += [read_stage.error_row(archives.loose_key(key), None, digest, why) for key, why in missing]
    if archive_objs:
        # Archives: their members' rows (all columns: a member skipped in a read archive gets its row again) as
        # Arrow; each archive to read leaves as a unit table through unit_sink (the object store), the rest counted.
        # Unreadable files were reported (and quarantined) by the first read.
        rows = manifest.read_latest(cfg.output_uri, quarantine_bad=False, log=lambda _: None)
        keys = rows.column("input_key")
        own = pa.array(sorted({archives.loose_key(o.key) for o in archive_objs}), pa.string())
        rows = rows.filter(pc.or_(pc.match_substring(keys, "#"), pc.is_in(keys, value_set=own)))  # stays sorted
        found = read_stage.plan_archives(archive_objs, rows, digest, cfg.output_uri, tar, cfg.retry_errors,
                                         unit_sink, cfg.output_suffix)
        del rows, keys
        work.units = found.units
        work.refused += found.refused
        work.num_skipped += found.num_skipped
        work.num_died += found.num_died
        work.num_archives_done = found.num_archives_done
    return work


def _input_pages(input_uri: str):
    """(base URI, pages of ObjectInfo, [(key, why)] of a pattern's missing names). A prefix streams page by page;
    one archive or a brace pattern (names given in full, so already bounded) comes as one listing."""
    if archives.has_braces(input_uri) or archives.is_archive(input_uri):
        inputs = read_stage.list_inputs(input_uri)
        if inputs.base_uri != input_uri or inputs.archives or inputs.missing or inputs.images:
            objs = sorted(inputs.images + inputs.archives, key=lambda o: o.key)
            return inputs.base_uri, [objs] if objs else [], inputs.missing
    suffixes = IMAGE_SUFFIXES + archives.ARCHIVE_SUFFIXES
    return input_uri, storage.iter_object_pages(input_uri, suffixes=suffixes), []


def _nested_prefix(input_uri: str, output_uri: str) -> str | None:
    base, out = input_uri.rstrip("/") + "/", output_uri.rstrip("/") + "/"
    return out[len(base):] if out.startswith(base) else None


WORKER_DIED = manifest.WORKER_DIED


class _OutputKeys:
    """manifest.output_key_for over a listing sorted by key, in bounded memory. Two inputs can only ask for the same
    output key if they share '<folder>/<name up to its first dot>.' ('a/b.jpg', 'a/b.png' and 'a/b.jpg.jpeg' all
    start 'a/b.'), and keys sharing a prefix are contiguous in sorted order: only the groups the listing is still
    inside keep their taken keys. An unsorted listing (not S3's or genray's) keeps every group instead."""

    def __init__(self, suffix: str = ".png"):
        self.suffix = suffix  # the output format's: a/b.jpg -> a/b.webp
        self.groups: dict[str, set[str]] = {}
        self.last, self.sorted, self.calls = "", True, 0

    def __call__(self, key: str) -> str:
        if key < self.last:
            self.sorted = False
        self.last = key
        self.calls += 1
        if self.sorted and self.calls % 256 == 0:
            self._forget(key)
        return self._take(key)

    def _take(self, key: str) -> str:
        dot = key.find(".", key.rfind("/") + 1)  # the name's first dot
        group = key[:dot + 1] if dot >= 0 else key + "."
        return manifest.output_key_for(key, self.groups.setdefault(group, set()), self.suffix)

    def _forget(self, key: str) -> None:
        for prefix in [p for p in self.groups if not key.startswith(p)]:
            del self.groups[prefix]  # key > prefix and does not start with it: no later key does either

    def page(self, keys: list[str], array: pa.Array) -> tuple[list[str], list[int]]:
        """The output keys of a page of the listing (`array`: the same keys in Arrow), and the positions of those
        that took the slow path (their input and output keys may need archives.loose_key and storage's checks).
        A plain key (no folder named like an archive) whose group is new gets its default output key, derived for
        the whole page at once with Arrow, and only a dict entry in Python; the others (collisions, unusual names)
        take output_key_for's path. The same keys as __call__ one by one."""
        fast = pc.and_(pc.match_substring_regex(array, _FAST_KEY),
                       pc.invert(pc.match_substring_regex(array, _ARCHIVE_FOLDER))).to_pylist()
        defaults, groups = _defaults_and_groups(array, self.suffix)
        # Sorted: within the page (Arrow compares UTF-8 bytes, which orders as Python compares str) and after the
        # page before.
        if self.sorted and len(keys) and (keys[0] < self.last or (len(keys) > 1 and not pc.all(pc.greater(
                array.slice(1), array.slice(0, len(keys) - 1))).as_py())):
            self.sorted = False
        outs, slow, taken = [], [], self.groups
        for i, (key, plain, default, group) in enumerate(zip(keys, fast, defaults, groups)):
            if plain and group not in taken:
                taken[group] = {default}
                outs.append(default)
            else:
                outs.append(self._take(key))
                slow.append(i)
        if len(keys):
            self.last = keys[-1]
            self.calls += len(keys)
            if self.sorted:
                self._forget(self.last)
        return outs, slow


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_. -]*(/[A-Za-z0-9_-][A-Za-z0-9_. -]*)*")


def _plain_key(key: str) -> bool:
    """Keys no storage rule can refuse (segments of letters, digits and '_-. ', none starting with '.'): these skip
    storage.join_uri's checks, which cost as much per key as the listing itself."""
    return _PLAIN_KEY.fullmatch(key) is not None


# The same in RE2 for Arrow, on input keys: an image key like this has a plain default output key, and needs neither
# archives.loose_key ('#', '%') nor archives.has_control.
_FAST_KEY = "^" + _PLAIN_KEY.pattern + "$"
_ARCHIVE_FOLDER = "(?i)(" + "|".join(re.escape(s) for s in archives.ARCHIVE_SUFFIXES) + ")/"  # marked: the slow path
_LONG_SUFFIXES = [s for s in IMAGE_SUFFIXES if len(s) == 5]  # the others have 4 characters
assert all(len(s) in (4, 5) and s.count(".") == 1 for s in IMAGE_SUFFIXES)


def _defaults_and_groups(array: pa.Array, suffix: str) -> tuple[list[str], list[str]]:
    """For plain image keys (_FAST_KEY, ASCII): manifest.with_suffix ('a/b.c.jpg' -> 'a/b.c.png': the image
    suffix's dot is the name's last, and a plain name does not start with '.') and _OutputKeys' group ('a/b.c.jpg'
    -> 'a/b.'), with Arrow string kernels (a regex replace costs several times more per key). Other keys get
    values the caller ignores."""
    lower = pc.ascii_lower(array)
    long = functools.reduce(pc.or_, [pc.ends_with(lower, s) for s in _LONG_SUFFIXES])
    stems = pc.if_else(long, pc.utf8_slice_codeunits(array, 0, -5), pc.utf8_slice_codeunits(array, 0, -4))
    defaults = pc.binary_join_element_wise(stems, suffix, "")
    # '/' + key splits from the right into [folders, name] ('' when there is no folder).
    folders_name = pc.split_pattern(pc.binary_join_element_wise("/", array, ""), "/", max_splits=1, reverse=True)
    first = pc.list_element(pc.split_pattern(pc.list_element(folders_name, 1), ".", max_splits=1), 0)
    groups = pc.utf8_slice_codeunits(
        pc.binary_join_element_wise(pc.list_element(folders_name, 0), "/", first, ".", ""), 1)
    return defaults.to_pylist(), groups.to_pylist()
_IMAGE = "(" + "|".join("".join(f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in suffix)
                         for suffix in IMAGE_SUFFIXES) + ")$"  # read_stage.is_image (ASCII case-insensitive)


def _diff_page(cfg: ProcessConfig, digest: str, tar: bool, images: list[storage.ObjectInfo], names: list[str],
               keys: pa.Array, out_keys: _OutputKeys, done: pa.Table, done_keys: pa.Array, work: Plan) -> pa.Table:
    """One listing page (`names`: its keys, `keys`: the same in Arrow) against the manifest: counts the skipped,
    records refused keys, returns the to-do rows."""
    outs, slow = out_keys.page(names, keys)
    if slow:
        images = list(images)
        unsafe = [i for i in slow if not _plain_key(outs[i])]
        for i in reversed(unsafe):  # the storage layer decides; only keys with unusual characters get that far
            try:
                storage.join_uri(cfg.output_uri, outs[i])
            except storage.UnsafeKeyError as err:
                obj = images.pop(i)
                outs.pop(i)
                work.refused.append(read_stage.error_row(archives.loose_key(obj.key), obj.etag, digest, str(err)))
        # input_key: '#' in a name is escaped (archives.loose_key), as the first '#' separates archive and member.
        keys = pa.array([archives.loose_key(o.key) for o in images], pa.string())
    page = pa.table([keys, [o.uri for o in images], [o.etag for o in images], outs, [o.size for o in images]],
                    schema=TODO_SCHEMA)
    if not page.num_rows or not len(done_keys):
        return page
    keys = page.column("input_key")
    lo_key, hi_key = pc.min_max(keys).values()
    lo = manifest.find_sorted(done_keys, lo_key.as_py())
    hi = manifest.find_sorted(done_keys, hi_key.as_py(), side="right")
    if lo == hi:
        return page
    near = done.slice(lo, hi - lo)  # the manifest's rows in this page's key range (sorted listing: about a page)
    prev = near.take(pc.index_in(keys, value_set=near.column("input_key").combine_chunks()))
    etags = page.column("input_etag")
    prev_out = prev.column("output_key")
    ok = manifest.current_mask(prev, etags, digest)
    if tar:  # 'shard-000012.tar#a/b.png': in some shard, under the key this run would write
        ok = pc.and_kleene(ok, pc.match_substring_regex(prev_out, _TAR_OUTPUT))
        prev_out = pc.replace_substring_regex(prev_out, _TAR_OUTPUT, "")
    ok = pc.fill_null(pc.and_kleene(ok, pc.equal(prev_out, page.column("output_key"))), False)
    if cfg.verify_outputs and pc.any(ok).as_py():
        ok = _verify_outputs(cfg, ok, pc.filter(prev.column("output_key"), ok))
    work.num_skipped += pc.sum(ok).as_py() or 0
    if not cfg.retry_errors:  # inputs that killed --max-attempts workers stay error rows, untouched
        died = manifest.died_mask(prev, etags, digest)
        work.num_died += pc.sum(died).as_py() or 0
        ok = pc.or_(ok, died)
    return page.filter(pc.invert(ok))


def _verify_outputs(cfg: ProcessConfig, ok: pa.Array, outputs: pa.Array) -> pa.Array:
    """--verify-outputs: of the rows the manifest says are done, keep those whose output object still exists."""
    def exists(output_key: str) -> bool:
        name = output_key.partition("#")[0] if cfg.output_format == "tar" else output_key  # tar: the shard
        try:
            storage.stat(storage.join_uri(cfg.output_uri, name))
            return True
        except storage.StorageError as err:
            if err.reason != "missing_object":
                raise
            return False

    names = outputs.to_pylist()
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        found = dict(zip(set(names), pool.map(exists, set(names))))
    flags = iter([found[n] for n in names])
    return pa.array([bool(v) and next(flags) for v in ok.to_pylist()])


class ProcessImages:
    """Ray Data callable class: the model loads once per actor; each call handles one batch of input rows."""

    def __init__(self, cfg: dict[str, Any], digest: str, num_threads: int, tracker=None, run_id: str | None = None):
        import torch

        from genray.inference import Predictor, pick_device

        self.cfg = ProcessConfig.model_validate(cfg)
        self.tracker = tracker
        if tracker is not None:  # an actor that dies while loading the model is restarted by Ray without limit
            starting = ray.get(tracker.actor_starting.remote())
            if starting > self.cfg.max_actors + self.cfg.max_attempts:
                raise JobError(f"model actors died {starting - self.cfg.max_actors} times while starting "
                               f"(--max-attempts {self.cfg.max_attempts}): not retrying further")
        torch.set_num_threads(num_threads)
        if self.cfg.model_uri is None:  # style job with a style image: Gatys optimisation per image
            from genray.process.gatys import GatysStylizer

            self.predictor = GatysStylizer(self.cfg)
        else:
            # On the GPU Ray assigned this actor (CPU when it was given none, or when CUDA is missing).
            device = pick_device(self.cfg.gpus_per_actor > 0)
            self.predictor = Predictor.from_uri(self.cfg.model_uri, device=device, tile=self.cfg.tile,
                                                tile_overlap=self.cfg.tile_overlap,
                                                batch_size=self.cfg.forward_batch_size or self.cfg.batch_size,
                                                precision=self.cfg.precision)
        if self.predictor.digest != digest:  # the artefact (or style image) was replaced after the job was planned
            raise JobError(f"{self.cfg.model_uri or self.cfg.style_image_uri}: changed while the job was starting")
        self.digest = digest
        # Every output PNG says which model made it (text chunks; genray.images.read_metadata reads them back).
        family = self.predictor.spec.name if hasattr(self.predictor, "spec") else "gatys"
        self.provenance = provenance(self.cfg.model_uri or self.cfg.style_image_uri,
                                     {"family": family, "digest": digest})
        self.scale = self.predictor.scale  # output pixels per input pixel along each side
        self.max_input_bytes = self.cfg.max_input_bytes or read_stage.max_member_bytes(self.cfg.max_pixels)
        self.node_id = ray.get_runtime_context().get_node_id()  # recorded per row: where the work ran
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="genray-io")
        # Loose outputs are written here, not by the driver: each batch checks that its run still holds the lease
        # on the output prefix before writing (tar shards are checked by the driver as it commits them).
        self.run_id = run_id if self.cfg.output_format == "files" else None
        # With overlap_io two calls run at once: one forward at a time, the other call's reads and writes meanwhile.
        self.forward_lock = threading.Lock()
        if tracker is not None:
            ray.get(tracker.actor_started.remote())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.perf_counter()
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["input_key"]))]
        # Rows the read stage finished already (skipped archive members, refused entries, an archive's own row).
        passed = [read_stage.passed_through(row["result"]) for row in rows if row.get("result")]
        rows = [row for row in rows if not row.get("result")]
        keys = [str(row["input_key"]) for row in rows]
        if self.tracker is None or not ray.get(self.tracker.begin_batch.remote(keys)):
            results = self._process(rows)
            if self.tracker is not None:
                ray.get(self.tracker.finish.remote(keys))
        else:
            # A worker died on this batch before: one input at a time, so only the input that kills is blamed.
            results = []
            for row, key in zip(rows, keys):
                prior = ray.get(self.tracker.begin.remote(key))
                if prior >= self.cfg.max_attempts:
                    results.append(self._row(row, "error", f"{WORKER_DIED} ({prior} attempts, limit "
                                                           f"--max-attempts {self.cfg.max_attempts})"))
                else:
                    results += self._process([row])
                ray.get(self.tracker.finish.remote([key]))
        per_image = (time.perf_counter() - started) / max(len(rows), 1)
        for r in results:
            r["seconds"] = per_image
        return read_stage.output_table(results + passed)

    def _process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The lease is read beside the batch's reads and forward (one small GET, off the critical path); a run
        # taken over meanwhile writes at most the batches already past this point.
        lease = self.io.submit(_lease_lost, self.cfg.output_uri, self.run_id) if self.run_id else None
        # [1] read + decode, all of the batch's objects at once: a remote store's latency is paid once per batch,
        # not once per image. A bad file is an error row.
        decoded = list(self.io.map(self._read, rows))
        results = [self._row(row, "error", got) for row, got in zip(rows, decoded) if isinstance(got, str)]
        good = [(row, got) for row, got in zip(rows, decoded) if not isinstance(got, str)]
        with self.forward_lock:  # [2] colour only: an alpha channel goes around the model (finish)
            outputs = self._predict([colour(image) for _, image in good], [row["input_key"] for row, _ in good])
        lost = lease.result() if lease is not None else None
        if lost:  # fails the job: its rows stay unrecorded, and the rerun after the other run redoes them
            raise LeaseError(lost)
        # [3] encode + write under the same relative key, again concurrently (Pillow and sockets release the GIL).
        results += self.io.map(self._write, good, outputs)
        return results

    def _read(self, row: dict[str, Any]) -> np.ndarray | str:
        try:
            data = row.get("data")  # an archive member's bytes came with the row; a loose file is read here
            if data is None:
                size = row.get("input_size")
                if size is not None and size > self.max_input_bytes:  # the listing's size: nothing is read
                    return (f"input too large: {int(size):,} bytes, limit {self.max_input_bytes:,} "
                            f"(--max-input-bytes)")
                # Capped again while reading: the object may have grown since it was listed.
                data = storage.read_bytes(row["input_uri"], max_bytes=self.max_input_bytes,
                                          root=self.cfg.input_uri)
            image = decode_image(data, channels=None, max_pixels=self.cfg.max_pixels, alpha=self.cfg.keeps_alpha)
        except (ImageError, storage.StorageError) as err:
            return str(err)
        height, width = output_size(self.cfg, self.scale, image)
        if height * width > self.cfg.max_output_pixels:
            return (f"output too large: {width}x{height} = {width * height:,} pixels, limit "
                    f"{self.cfg.max_output_pixels:,} (--max-output-pixels)")
        return image

    def _write(self, item: tuple[dict[str, Any], np.ndarray], out: np.ndarray | Exception) -> dict[str, Any]:
        row, image = item
        h, w = image.shape[:2]
        if isinstance(out, Exception):
            return self._row(row, "error", f"model failed: {out}", w, h)
        try:
            data = encode_image(finish(self.cfg, self.scale, image, out),
                                "jpeg" if self.cfg.ext == "jpg" else self.cfg.ext, quality=self.cfg.quality,
                                metadata=self.provenance)
            if self.cfg.output_format == "tar":  # the driver writes it into a shard
                return {**self._row(row, "ok", None, w, h), "data": data, "sidecars": row.get("sidecars")}
            root = self.cfg.output_uri  # locally: no symlink under the output prefix leads a write outside it
            storage.write_bytes(storage.join_uri(self.cfg.output_uri, row["output_key"]), data, root=root)
            for name, data in read_stage.decode_sidecars(row.get("sidecars")):  # key.json beside key.png
                storage.write_bytes(storage.join_uri(self.cfg.output_uri, name), data, root=root)
            return self._row(row, "ok", None, w, h)
        except storage.StorageError as err:
            return self._row(row, "error", str(err), w, h)

    def _predict(self, images: list[np.ndarray], names: list[str]) -> list[np.ndarray | Exception]:
        """One batched call for the whole batch (the Predictor batches tiles of all images together)."""
        # Gatys takes the names too, for its per-image progress lines.
        run = functools.partial(self.predictor, names=names) if self.cfg.model_uri is None else self.predictor
        try:
            return run(images)
        except Exception:
            # Find the image that breaks the batch instead of failing all of them.
            outs: list[np.ndarray | Exception] = []
            for image in images:
                try:
                    outs.append(self.predictor([image])[0])
                except Exception as err:  # noqa: BLE001 - recorded in the manifest row
                    outs.append(err)
            return outs

    def _row(self, row, status, error, width=None, height=None) -> dict[str, Any]:
        return {"input_key": row["input_key"], "output_key": row["output_key"] if status == "ok" else None,
                "status": status, "error": error, "input_etag": row["input_etag"], "model_digest": self.digest,
                "width": width, "height": height, "seconds": 0.0, "node_id": self.node_id}


def _lease_lost(output_uri: str, run_id: str) -> str | None:
    """lost_lease, where a storage error means "cannot tell" (None): a blip reading the lease must not fail a
    job, and the driver's renewal thread keeps watching it."""
    try:
        return lost_lease(output_uri, run_id)
    except storage.StorageError:
        return None


def output_size(cfg: ProcessConfig, scale: float, image: np.ndarray) -> tuple[int, int]:
    """(height, width) of the image a job writes for `image`: the model's `scale`, or --outscale's."""
    scale = cfg.outscale or scale
    return max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))


def finish(cfg: ProcessConfig, scale: float, image: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The model's output at the size --outscale asks (Lanczos, as Real-ESRGAN), with the input's alpha channel
    (if it kept one) resized to match: transparency survives a model that only knows colour."""
    height, width = output_size(cfg, scale, image)
    if out.shape[:2] != (height, width):
        out = resize(out, width, height, Image.Resampling.LANCZOS)
    if image.shape[2] in (2, 4):
        alpha = resize(image[:, :, -1:], width, height, Image.Resampling.LANCZOS)
        out = np.concatenate([out, alpha], axis=2)
    return out


def colour(image: np.ndarray) -> np.ndarray:
    """An image without its alpha channel (decode_image(alpha=True) puts it last: 2 or 4 channels)."""
    return image[:, :, :-1] if image.shape[2] in (2, 4) else image


def actor_cpus(cfg: ProcessConfig, reserved: float = 0.5) -> float:
    """CPUs per model actor: as configured, but leave `reserved` CPUs for Ray Data's own tasks on a small cluster
    (a whole one when archives are read: an archive's read task takes one, see _dataset)."""
    total = ray.cluster_resources().get("CPU", 1.0)
    # Sized so the MIN actors a job starts with fit now; a pool that grows gets its CPUs from the nodes that join.
    return max(0.25, min(cfg.cpus_per_actor, (total - reserved) / cfg.min_actors))


def actor_threads(cpus: float) -> int:
    """torch threads of a model actor granted `cpus` (1.5 CPUs -> 2 threads: the half CPU kept for Ray Data's own
    tasks is mostly idle)."""
    return max(1, math.ceil(round(cpus, 6)))


def check_apart(cfg: ProcessConfig) -> None:
    """The output prefix must be neither the input nor inside it nor around it, after normalisation ('.', '..',
    doubled or trailing slashes, symlinked folders): else a job writes over its inputs (a.png -> a.png) or a rerun
    reads its own outputs as new inputs."""
    root = read_stage.input_root(cfg.input_uri)
    if storage.overlaps(root, cfg.output_uri):
        raise JobError(f"output {cfg.output_uri} overlaps input {cfg.input_uri} (the same place, or one inside the "
                       f"other, once '.', '..', doubled slashes and symbolic links are resolved): the job would "
                       f"overwrite its inputs or read its outputs as inputs; choose an output prefix beside the input")


def run_process_job(cfg: ProcessConfig, log=print, udf: type = None, read_fn=None) -> JobSummary:
    """Run the job; `udf` swaps the actor class and `read_fn` the read stage's read_stage.unit_rows (tests inject
    faults through them). A real run holds a lease on the output prefix (genray.process.lease): a second run at
    once is refused."""
    meta = check_model(cfg)
    check_apart(cfg)
    if cfg.dry_run:
        return _run_process_job(cfg, log, udf, read_fn, meta)
    try:
        lease = Lease(cfg.output_uri, manifest.new_run_id(), cfg.lease_seconds, log).acquire()
    except LeaseError as err:
        raise JobError(str(err)) from None
    except storage.StorageError as err:
        raise JobError(f"output {err}") from None
    try:
        return _run_process_job(cfg, log, udf, read_fn, meta, lease)
    finally:
        lease.release()


def _run_process_job(cfg: ProcessConfig, log, udf: type | None, read_fn, meta: dict[str, Any],
                     lease: Lease | None = None) -> JobSummary:
    """The job under its `lease` (None: a dry run, which writes nothing)."""
    udf = udf or ProcessImages
    digest = meta["digest"]
    summary = JobSummary(run_id=lease.run_id if lease else manifest.new_run_id())
    if cfg.dry_run:
        def sink(table: pa.Table) -> None:  # the dry run logs each block as it is planned and keeps nothing
            for key, out in zip(table.column("input_key").to_pylist(), table.column("output_key").to_pylist()):
                log(f"  would process {key} -> {out}")
        unit_sink = None
    else:  # blocks and archive units go to the object store as they are planned: the driver keeps their refs
        sink = unit_sink = ray.put
    work = plan(cfg, digest, sink, log, unit_sink)
    units = work.units
    log(f"[genray] {work.num_todo + work.num_skipped + len(work.refused)} inputs under {cfg.input_uri}: "
        f"{work.num_todo} to process, {work.num_skipped} already done with model {digest[:19]}, "
        f"{len(work.refused)} refused"
        + (f"; {len(units)} archives to read (their members are counted as they stream)" if units else ""))
    summary.counts.update(skipped=work.num_skipped, error=work.num_died)
    if cfg.dry_run:
        for table in units:
            unit = json.loads(table.column("unit")[0].as_py())
            log(f"  would read archive {unit['key']} ({unit['size']:,} bytes, {unit['num_done']} members done)")
        return summary

    try:  # a missing output bucket is the user's to create: fail before any work, naming it
        storage.list_objects(storage.join_uri(cfg.output_uri, manifest.MANIFEST_DIR))
    except storage.StorageError as err:
        raise JobError(f"output {err}") from None
    started = time.perf_counter()
    # Skipped inputs get no new row: the row of the run that made their output stays (rewriting it would make a
    # rerun of a ten-million-input job write ten million rows).
    part, pending, last_flush = 0, list(work.refused), time.monotonic()
    for row in pending:
        summary.record(row)
    if work.todo or units:
        # On the driver's node: the tracker must outlive any worker node the job loses.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        tracker = ray.remote(num_cpus=0, scheduling_strategy=here)(AttemptTracker).remote()
        ds = _dataset(cfg, work, digest, udf, log, tracker, read_fn, lease.run_id)
        # Each shard is committed only while this run still holds the lease (the renewal thread alone cannot stop
        # a run that was paused past its expiry and taken over from writing shards beside the new holder).
        rows = read_stage.DriverRows(cfg.output_uri, cfg.output_format == "tar", cfg.shard_size,
                                     cfg.shard_bytes, before_commit=lease.check)
        progress = Progress(None if units else work.num_todo, log)
        try:
            for row in ds.iter_rows():
                if lease.lost:  # the renewal thread saw another run take the lease over: stop the job now
                    lease.check()
                row = {c: _plain(row[c]) for c in row}
                if row.get("num_rows") is None:  # an image (not an archive's own row): progress as it comes back
                    progress.update(row["status"])
                shards = rows.shards_committed
                ready = rows.add(row)  # into the manifest once its output is durable (see DriverRows)
                pending += ready
                for r in ready:
                    summary.record(r)
                # A committed shard's rows go to the manifest at once: a crash then cannot leave a shard that the
                # manifest does not know (whose images the rerun would write a second time).
                if rows.shards_committed > shards or len(pending) >= FLUSH_ROWS \
                        or time.monotonic() - last_flush > FLUSH_SECONDS:
                    manifest.write_part(cfg.output_uri, summary.run_id, part, pending)
                    part, pending, last_flush = part + 1, [], time.monotonic()
            ready = rows.close()
            pending += ready
            for r in ready:
                summary.record(r)
        except Exception as err:
            # Keep what finished: rerunning the same command then redoes only the rest.
            rows.abort()
            manifest.write_part(cfg.output_uri, summary.run_id, part, pending)
            # A model actor that found the lease lost fails the dataset with its LeaseError inside Ray's error.
            lost = str(err) if isinstance(err, LeaseError) else _lease_lost(cfg.output_uri, summary.run_id)
            if lost:  # the run holding the lease compacts (two at once could drop rows)
                raise JobError(lost) from None
            manifest.compact(cfg.output_uri, summary.run_id, log)
            raise JobError(f"the job failed after {sum(progress.counts.values())} of {progress.total or '?'} images "
                           f"(rerun the same command to resume): {ray_error_line(err)}") from err
    manifest.write_part(cfg.output_uri, summary.run_id, part, pending)
    summary.seconds = time.perf_counter() - started
    try:
        lease.check()
    except LeaseError as err:
        raise JobError(str(err)) from None
    summary.manifest_uri = manifest.compact(cfg.output_uri, summary.run_id, log)
    return summary


def _dataset(cfg: ProcessConfig, work: Plan, digest: str, udf: type, log, tracker=None,
             read_fn=None, run_id: str | None = None) -> ray.data.Dataset:
    """The Ray Data pipeline: (archives streamed into rows by read tasks ->) model actors."""
    cpus = actor_cpus(cfg, reserved=1.0 if work.units else 0.5)
    # Start the MIN model actors before any data flows (Ray Data otherwise starts them in the background and the
    # first one ready takes the work, leaving the others idle on a short job); long enough for an autoscaling
    # cluster to add a node, after which a pool that cannot be placed fails with Ray's reason.
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # Hand each batch to the least busy actor rather than to one on the node that holds the batch: the inputs
    # are small next to the model's work, and locality piles a short job onto a single actor. Ray 2.60 marks the
    # option deprecated ("managed internally") but still obeys it, so it stays, without the notice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ctx.execution_options.actor_locality_enabled = False
    resources = ray.cluster_resources()
    for name, per_actor in (("CPU", cpus), ("GPU", cfg.gpus_per_actor)):
        total = resources.get(name, 0.0)
        if per_actor and cfg.min_actors * per_actor > total:
            log(f"[genray] {cfg.min_actors} model actors x {per_actor:g} {name}s do not fit in the cluster's "
                f"{total:g} {name}s now: waiting up to {ACTOR_START_TIMEOUT_S} s for more nodes (lower "
                f"--concurrency{' or --gpus-per-actor' if name == 'GPU' else ''} otherwise)")
    if work.units:
        # One read task per archive (and per group of loose images), each streaming its rows out in small blocks.
        # The driver holds refs only: an archive's unit table is its own block (one read task each), and the
        # loose images' blocks become units of read_stage.FILES_PER_UNIT images in Ray tasks.
        ds = ray.data.from_arrow_refs(work.units)
        if work.todo:
            ds = ds.union(ray.data.from_arrow_refs(work.todo).map_batches(
                read_stage.file_units, batch_size=read_stage.FILES_PER_UNIT, batch_format="pyarrow"))
        # Read tasks keep Ray Data's max_retries=-1 (a lost node must not fail the job, as for the model actors
        # below): the tracker bounds what one archive or loose file can cost (read_stage._tracked_archive).
        ds = ds.map_batches(read_stage.read_units, batch_size=1,
                            fn_kwargs={"digest": digest, "tar": cfg.output_format == "tar",
                                       "max_member_bytes": read_stage.archive_limits(cfg),
                                       "rows_per_block": cfg.batch_size, "tracker": tracker,
                                       "max_attempts": cfg.max_attempts, "read": read_fn})
        # Ray Data gathers a task's output into blocks of up to target_max_block_size (128 MB): cut them at one
        # batch instead, so one archive feeds every model actor and finished rows stream back as they are done.
        # Ray Data fuses this into the read tasks only if both ask for the same resources: the default, 1 CPU
        # (repartition takes no num_cpus), which is why actor_cpus reserves a whole CPU here.
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    else:
        # The planned blocks as they are in the object store: nothing is gathered on the driver.
        ds = ray.data.from_arrow_refs(work.todo)
    overlap = cfg.overlap_io if cfg.overlap_io is not None else cfg.gpus_per_actor > 0
    if cfg.min_actors == cfg.max_actors:
        pool = ray.data.ActorPoolStrategy(size=cfg.min_actors, **_overlap_args(overlap))
    else:  # Ray Data adds actors (up to MAX) while batches wait and the cluster has room, e.g. a node joined
        pool = ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors, **_overlap_args(overlap))
    return ds.map_batches(
        udf,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "digest": digest,
                               "num_threads": actor_threads(cpus), "tracker": tracker, "run_id": run_id},
        batch_size=cfg.batch_size,
        compute=pool,
        num_cpus=cpus,
        # Ray hides GPUs from a worker that asked for none: without this, GPU nodes would run the model on CPU.
        num_gpus=cfg.gpus_per_actor or None,
        # Ray Data's default for an actor pool (max_restarts=-1, max_task_retries=-1: dead actors restarted, their
        # batches retried without limit) stays: AttemptTracker bounds what one input can cost (after max_attempts
        # deaths it is an error row, not a retry). A count here would also be spent by a lost node: its actors'
        # batches are retried at once, again and again, while the actors are rescheduled ("actor temporarily
        # unavailable"), and the job failed (test_cluster_multinode). Not passed explicitly: Ray 2.60 deprecates
        # map_batches(**ray_remote_args).
        # Placement is Ray Data's default, SPREAD: the actors go to as many nodes as have room, so losing a node
        # loses fewer of them (the manifest's node_id column shows where each image ran).
    )


def _overlap_args(overlap: bool) -> dict[str, Any]:
    """Two calls per actor (threads), so decoding and encoding run while the other call's forward holds the lock."""
    return {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True} if overlap else {}


class Progress:
    """done/total, ok/error, images/s and time left: on a terminal (log=logs.progress, stdout a TTY) one bar redrawn
    every second; elsewhere, as when the output goes to a job's log, a plain line every PROGRESS_SECONDS and at
    the end."""

    WIDTH = 30

    def __init__(self, total: int | None, log=print):
        """total: None when it is not known up front (archives are counted as they stream)."""
        self.total, self.log, self.counts = total, log, Counter(ok=0, error=0)
        self.started = self.last = time.monotonic()
        self.redraw = log is logs.progress and logs.redraws()
        self.interval = 1.0 if self.redraw else PROGRESS_SECONDS
        if self.redraw:
            self.log = lambda line: logs.bar(line, final=sum(self.counts.values()) == self.total)

    def update(self, status: str) -> None:
        self.counts[status] += 1
        done, now = sum(self.counts.values()), time.monotonic()
        if now - self.last < self.interval and done != self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        counts = f"ok={self.counts['ok']} error={self.counts['error']} {rate:.2f} images/s"
        if self.total is None:
            self.log(f"[genray] {done} done {counts}")
            return
        bar = "#" * round(self.WIDTH * done / max(self.total, 1))
        self.log(f"[genray] [{bar:<{self.WIDTH}}] {done}/{self.total} {counts}, {(self.total - done) / rate:.0f}s left")


def _plain(value: Any) -> Any:
    """numpy scalars from Ray Data rows -> Python values for pyarrow; NaN widths (error rows) -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
