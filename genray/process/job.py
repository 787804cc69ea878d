"""`genray process`: a Ray Data job that runs a model artefact over every image under a prefix.

list -> skip what the manifest says is done -> (Ray Data) read + decode + Predictor + encode + write in model
actors -> manifest rows streamed back to the driver and flushed as parquet parts -> compacted manifest.
A bad input becomes an `error` row; it never stops the job.
"""
from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from genray import archives, storage
from genray.model_artifact import ArtifactError, read_meta
from genray.process import read_stage
from genray.process import manifest
from genray.process.attempts import AttemptTracker
from genray.config import ProcessConfig
from genray.images import ImageError, decode_image, encode_png

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
    todo: list[dict[str, Any]]  # loose images to process
    skipped: list[dict[str, Any]]  # rows the manifest has done with this model and input ETag
    refused: list[dict[str, Any]]  # error rows before any work, e.g. a key that would escape the output prefix
    units: list[dict[str, Any]]  # archives to read (batch.archives.plan_archives)


def plan(cfg: ProcessConfig, digest: str) -> Plan:
    tar = cfg.output_format == "tar"
    try:
        inputs = read_stage.list_inputs(cfg.input_uri)
    except storage.StorageError as err:
        raise JobError(str(err)) from None
    out_rel = _nested_prefix(inputs.base_uri, cfg.output_uri)

    def mine(obj: storage.ObjectInfo) -> bool:  # never eat our own outputs
        return bool(out_rel) and obj.key.startswith(out_rel)

    done = manifest.read_manifest(cfg.output_uri)
    units, skipped, refused = read_stage.plan_archives([o for o in inputs.archives if not mine(o)], done,
                                                           digest, cfg.output_uri, tar, cfg.retry_errors)
    refused += [read_stage.error_row(archives.loose_key(key), None, digest, why) for key, why in inputs.missing]
    todo, taken = [], set()
    for obj in inputs.images:
        if mine(obj):
            continue
        out_key = manifest.output_key_for(obj.key, taken)
        try:
            storage.join_uri(cfg.output_uri, out_key)
        except storage.UnsafeKeyError as err:
            refused.append(read_stage.error_row(archives.loose_key(obj.key), obj.etag, digest, str(err)))
            continue
        input_key = archives.loose_key(obj.key)  # '#' in a name is escaped: it separates archive and member
        prev = done.get(input_key)
        if manifest.is_done(prev, obj.etag, digest, out_key, tar):
            skipped.append({**prev, "status": "skipped", "error": None, "seconds": 0.0})
        elif not cfg.retry_errors and manifest.died_before(prev, obj.etag, digest):
            skipped.append({**prev, "seconds": 0.0})  # stays an error row; --retry-errors redoes it
        else:
            todo.append({"input_key": input_key, "input_uri": obj.uri, "input_etag": obj.etag, "output_key": out_key,
                         "input_size": obj.size})
    return Plan(todo, skipped, refused, units)


def _nested_prefix(input_uri: str, output_uri: str) -> str | None:
    base, out = input_uri.rstrip("/") + "/", output_uri.rstrip("/") + "/"
    return out[len(base):] if out.startswith(base) else None


WORKER_DIED = manifest.WORKER_DIED


class ProcessImages:
    """Ray Data callable class: the model loads once per actor; each call handles one batch of input rows."""

    def __init__(self, cfg: dict[str, Any], digest: str, num_threads: int, tracker=None):
        import torch

        from genray.inference import Predictor

        self.cfg = ProcessConfig.model_validate(cfg)
        self.tracker = tracker
        if tracker is not None:  # an actor that dies while loading the model is restarted by Ray without limit
            starting = ray.get(tracker.actor_starting.remote())
            if starting > self.cfg.concurrency + self.cfg.max_attempts:
                raise JobError(f"model actors died {starting - self.cfg.concurrency} times while starting "
                               f"(--max-attempts {self.cfg.max_attempts}): not retrying further")
        torch.set_num_threads(num_threads)
        if self.cfg.model_uri is None:  # style job with a style image: Gatys optimisation per image
            from genray.process.gatys import GatysStylizer

            self.predictor = GatysStylizer(self.cfg)
        else:
            self.predictor = Predictor.from_uri(self.cfg.model_uri, tile=self.cfg.tile,
                                                tile_overlap=self.cfg.tile_overlap,
                                                batch_size=self.cfg.forward_batch_size or self.cfg.batch_size)
        if self.predictor.digest != digest:  # the artefact (or style image) was replaced after the job was planned
            raise JobError(f"{self.cfg.model_uri or self.cfg.style_image_uri}: changed while the job was starting")
        self.digest = digest
        self.scale = self.predictor.scale  # output pixels per input pixel along each side
        self.max_input_bytes = self.cfg.max_input_bytes or read_stage.max_member_bytes(self.cfg.max_pixels)
        self.node_id = ray.get_runtime_context().get_node_id()  # recorded per row: where the work ran
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="genray-io")
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
        # [1] read + decode, all of the batch's objects at once: a remote store's latency is paid once per batch,
        # not once per image. A bad file is an error row.
        decoded = list(self.io.map(self._read, rows))
        results = [self._row(row, "error", got) for row, got in zip(rows, decoded) if isinstance(got, str)]
        good = [(row, got) for row, got in zip(rows, decoded) if not isinstance(got, str)]
        outputs = self._predict([image for _, image in good], [row["input_key"] for row, _ in good])  # [2]
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
            image = decode_image(data, channels=None, max_pixels=self.cfg.max_pixels)
        except (ImageError, storage.StorageError) as err:
            return str(err)
        height, width = image.shape[0] * self.scale, image.shape[1] * self.scale
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
            png = encode_png(out)
            if self.cfg.output_format == "tar":  # the driver writes it into a shard
                return {**self._row(row, "ok", None, w, h), "data": png, "sidecars": row.get("sidecars")}
            root = self.cfg.output_uri  # locally: no symlink under the output prefix leads a write outside it
            storage.write_bytes(storage.join_uri(self.cfg.output_uri, row["output_key"]), png, root=root)
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


def actor_cpus(cfg: ProcessConfig, reserved: float = 0.5) -> float:
    """CPUs per model actor: as configured, but leave `reserved` CPUs for Ray Data's own tasks on a small cluster
    (a whole one when archives are read: an archive's read task takes one, see _dataset)."""
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.25, min(cfg.cpus_per_actor, (total - reserved) / cfg.concurrency))


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


def run_process_job(cfg: ProcessConfig, log=print, udf: type = None) -> JobSummary:
    """Run the job; `udf` swaps the actor class (tests inject faults through a subclass of ProcessImages).
    A real run holds a lease on the output prefix (genray.process.lease): a second run at once is refused."""
    meta = check_model(cfg)
    check_apart(cfg)
    if cfg.dry_run:
        return _run_process_job(cfg, log, udf, meta)
    from genray.process.lease import Lease, LeaseError

    run_id = manifest.new_run_id()
    try:
        lease = Lease(cfg.output_uri, run_id, cfg.lease_seconds, log).acquire()
    except LeaseError as err:
        raise JobError(str(err)) from None
    except storage.StorageError as err:
        raise JobError(f"output {err}") from None
    try:
        return _run_process_job(cfg, log, udf, meta, run_id)
    finally:
        lease.release()


def _run_process_job(cfg: ProcessConfig, log, udf: type | None, meta: dict[str, Any],
                     run_id: str | None = None) -> JobSummary:
    udf = udf or ProcessImages
    digest = meta["digest"]
    summary = JobSummary(run_id=run_id or manifest.new_run_id())
    work = plan(cfg, digest)
    todo, units = work.todo, work.units
    num_skipped = sum(r.get("num_rows") is None for r in work.skipped)  # images, not the archives' own rows
    log(f"[genray] {len(todo) + num_skipped + len(work.refused)} inputs under {cfg.input_uri}: {len(todo)} to "
        f"process, {num_skipped} already done with model {digest[:19]}, {len(work.refused)} refused"
        + (f"; {len(units)} archives to read (their members are counted as they stream)" if units else ""))
    if cfg.dry_run:
        for row in todo:
            log(f"  would process {row['input_key']} -> {row['output_key']}")
        for unit in units:
            log(f"  would read archive {unit['key']} ({unit['size']:,} bytes, {len(unit['done'])} members done)")
        summary.counts.update(skipped=num_skipped)
        return summary

    try:  # a missing output bucket is the user's to create: fail before any work, naming it
        storage.list_objects(storage.join_uri(cfg.output_uri, manifest.MANIFEST_DIR))
    except storage.StorageError as err:
        raise JobError(f"output {err}") from None
    started = time.perf_counter()
    part, pending, last_flush = 0, work.skipped + work.refused, time.monotonic()
    for row in pending:
        summary.record(row)
    if todo or units:
        tracker = ray.remote(num_cpus=0)(AttemptTracker).remote()
        ds = _dataset(cfg, work, digest, udf, log, tracker)
        rows = read_stage.DriverRows(cfg.output_uri, cfg.output_format == "tar", cfg.shard_size,
                                         cfg.shard_bytes)
        progress = Progress(None if units else len(todo), log)
        try:
            for row in ds.iter_rows():
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
            manifest.compact(cfg.output_uri, summary.run_id)
            raise JobError(f"the job failed after {sum(progress.counts.values())} of {progress.total or '?'} images "
                           f"(rerun the same command to resume): {_root_cause(err)}") from err
    manifest.write_part(cfg.output_uri, summary.run_id, part, pending)
    summary.seconds = time.perf_counter() - started
    summary.manifest_uri = manifest.compact(cfg.output_uri, summary.run_id)
    return summary


def _dataset(cfg: ProcessConfig, work: Plan, digest: str, udf: type, log, tracker=None) -> ray.data.Dataset:
    """The Ray Data pipeline: (archives streamed into rows by read tasks ->) model actors."""
    cpus = actor_cpus(cfg, reserved=1.0 if work.units else 0.5)
    # Start every model actor before any data flows (Ray Data otherwise starts them in the background and the
    # first one ready takes the work, leaving the others idle on a short job); long enough for an autoscaling
    # cluster to add a node, after which a pool that cannot be placed fails with Ray's reason.
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # Hand each batch to the least busy actor rather than to one on the node that holds the batch: the inputs
    # are small next to the model's work, and locality piles a short job onto a single actor.
    ctx.execution_options.actor_locality_enabled = False
    total = ray.cluster_resources().get("CPU", 0.0)
    if cfg.concurrency * cpus > total:
        log(f"[genray] {cfg.concurrency} model actors x {cpus:g} CPUs do not fit in the cluster's {total:g} CPUs "
            f"now: waiting up to {ACTOR_START_TIMEOUT_S} s for more nodes (lower --concurrency otherwise)")
    if work.units:
        # One read task per archive (and per group of loose images), each streaming its rows out in small blocks.
        units = work.units + read_stage.file_units(work.todo)
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
        ds = ds.map_batches(read_stage.read_units, batch_size=1,
                            fn_kwargs={"digest": digest, "tar": cfg.output_format == "tar",
                                       "max_member_bytes": read_stage.archive_limits(cfg),
                                       "rows_per_block": cfg.batch_size})
        # Ray Data gathers a task's output into blocks of up to target_max_block_size (128 MB): cut them at one
        # batch instead, so one archive feeds every model actor and finished rows stream back as they are done.
        # Ray Data fuses this into the read tasks only if both ask for the same resources: the default, 1 CPU
        # (repartition takes no num_cpus), which is why actor_cpus reserves a whole CPU here.
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    else:
        ds = ray.data.from_items(work.todo, override_num_blocks=max(1, min(len(work.todo) // cfg.batch_size, 64)))
    return ds.map_batches(
        udf,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "digest": digest,
                               "num_threads": actor_threads(cpus), "tracker": tracker},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cpus,
        # Ray Data restarts dead actors and retries their batches without limit; AttemptTracker bounds what one
        # input can cost, so a batch needs at most one try per attempt of each of its inputs, plus the first.
        max_task_retries=cfg.batch_size * cfg.max_attempts + 1,
        # Placement is Ray Data's default, SPREAD: the actors go to as many nodes as have room, so losing a node
        # loses fewer of them (the manifest's node_id column shows where each image ran).
    )


class Progress:
    """One line every PROGRESS_SECONDS (and at the end): done/total, ok/error, images/s and time left.
    Plain lines rather than a redrawn bar, because bulk jobs mostly run with their output going to a log."""

    WIDTH = 30

    def __init__(self, total: int | None, log=print):
        """total: None when it is not known up front (archives are counted as they stream)."""
        self.total, self.log, self.counts = total, log, Counter(ok=0, error=0)
        self.started = self.last = time.monotonic()

    def update(self, status: str) -> None:
        self.counts[status] += 1
        done, now = sum(self.counts.values()), time.monotonic()
        if now - self.last < PROGRESS_SECONDS and done != self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        counts = f"ok={self.counts['ok']} error={self.counts['error']} {rate:.2f} images/s"
        if self.total is None:
            self.log(f"[genray] {done} done {counts}")
            return
        bar = "#" * round(self.WIDTH * done / max(self.total, 1))
        self.log(f"[genray] [{bar:<{self.WIDTH}}] {done}/{self.total} {counts}, {(self.total - done) / rate:.0f}s left")


def _root_cause(err: BaseException) -> str:
    """The last line of the innermost error: Ray wraps a worker's exception in pages of traceback."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def _plain(value: Any) -> Any:
    """numpy scalars from Ray Data rows -> Python values for pyarrow; NaN widths (error rows) -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
