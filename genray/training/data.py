"""Training data as a Ray Data dataset: loose images, archives or WebDataset shards, read and decoded by Ray Data
tasks (genray.datasets.read_units, which imports no torch: a fresh read worker starts in about a second) and
streamed to the Ray Train workers (`get_dataset_shard`), so no worker ever holds the dataset.

Driver side: `build_dataset` (units -> shuffled blocks of decoded rows) and `fixed_rows` (the sample grid's images).
Worker side: `TrainingStream` turns the worker's shard into the family's collated batches, reading the next epoch's
rows while this one trains (per-image preparation such as random crops runs here, seeded by (seed, epoch, key)).
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
from typing import Any, Iterator

import numpy as np

from genray.config import TrainConfig
from genray.datasets import decode_row, list_units, read_units, unit_rows

MAX_ERROR_KEYS = 20  # keys of skipped files kept per epoch in metrics.jsonl (all are counted and logged)
from genray.models.data import prepare_items

# --------------------------------------------------------------------------------------- driver: dataset

def build_dataset(cfg: TrainConfig, channels: int | None):
    """The training set as a Ray Data dataset of decoded rows. Unit (file group / shard) order is reshuffled on
    every execution, i.e. every epoch (reproducibly from train.seed); small datasets (data.materialize) are read
    once and kept in the object store, larger ones are read again each epoch, streaming."""
    import ray
    import ray.data
    from ray.data import RandomSeedConfig, TaskPoolStrategy

    units, total_bytes = list_units(cfg.data.uri, cfg.data, cfg.data.limit)
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    materialize = cfg.data.materialize == "always" or (
        cfg.data.materialize == "auto" and total_bytes <= cfg.data.materialize_max_bytes)
    shuffle = RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
    if not materialize and cfg.data.limit is None:
        ds = ds.randomize_block_order(seed=shuffle)  # units are blocks: this shuffles files and shards
    ds = ds.map_batches(read_units, batch_size=1, batch_format="numpy", num_cpus=cfg.data.cpus_per_read_task,
                        compute=TaskPoolStrategy(cfg.data.max_read_tasks
                                                 or max(1, int(ray.cluster_resources().get("CPU", 1)))),
                        fn_kwargs={"channels": channels, "data": cfg.data.model_dump(mode="json")})
    if cfg.data.limit is not None:
        ds = ds.limit(cfg.data.limit)
    if materialize:
        ds = equal_blocks(ds.materialize(), cfg.scaling.num_workers).randomize_block_order(seed=shuffle)
    return ds


def equal_blocks(ds, world: int, rows_per_block: int = 16):
    """The materialised rows as blocks of one size, a multiple of `world` of them, topped up with copies of the
    first good rows (fewer than one per block; never a row with an error).

    Ray Train hands each worker an equal share of rows every epoch (streaming_split(equal=True)); when the blocks
    dealt out do not add up evenly, Ray Data cuts one with a remote task, and on a node whose CPUs all train, the
    raylet starts a worker process for it (and stops it again, idle): ~1.5 s of CPU per epoch on 2 cores, a few
    % of the training's throughput. Equal blocks, as many per worker, always add up, so no epoch needs a cut."""
    count = ds.count()
    num_blocks = world * max(1, -(-count // (world * rows_per_block)))
    pad = -count % num_blocks
    if pad:
        good = ds.filter(lambda row: row["error"] is None).limit(pad)
        ds = ds.union(good)
    return ds.repartition(num_blocks).materialize()


def fixed_rows(cfg: TrainConfig, channels: int | None) -> list[tuple[np.ndarray, int, str]]:
    """num_samples images for the per-epoch sample grid, read here once: the same in every epoch and after a
    resume. Loose files are picked spread over the key order (key-sorted data is often class-sorted); archives
    give the first images of the first shard."""
    n = cfg.train.num_samples
    units, _ = list_units(cfg.data.uri, cfg.data, cfg.data.limit)
    files = [f for u in units if u["kind"] == "files" for f in u["files"]]
    if files:
        units = [{"kind": "files", "files": files[::max(1, len(files) // n)][:n]}]
    rows = []
    for unit in units:
        for row in unit_rows(unit, channels, cfg.data):
            if row["error"] is None:
                rows.append((decode_row(row), int(row["label"]), row["key"]))
            if len(rows) >= n:
                return rows
    return rows


# -------------------------------------------------------------------------------------- worker: batches

def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed word for one image's preparation in one epoch (independent of which worker reads it)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TrainingStream:
    """This worker's shard over the run's epochs, as collated training batches of train.batch_size items.

    A fetcher thread reads the shard's row blocks, epoch after epoch, into a small queue. Ray Data starts an
    epoch's execution only once every worker has asked for it, and that start (plus, unmaterialised, the first
    reads) took 1-1.5 s per epoch on 2 cores during which no step ran: asking as soon as this worker has read its
    rows of the current epoch hides it behind the steps still to train on the items buffered below.

    Rows pass Ray Data's local shuffle buffer (data.shuffle_rows images), each image becomes the family's items
    (prepare_items, here: it costs a few ms per epoch, far less than shipping float crops through the object
    store), and items pass a shuffle buffer of up to data.shuffle_items, so crops of one photo spread over many
    batches. Memory per worker: the two buffers plus at most another shuffle_rows images queued ahead."""

    def __init__(self, shard, cfg: TrainConfig, rank: int, epochs: range):
        self.cfg, self.rank = cfg, rank
        self.block_rows = min(cfg.data.shuffle_rows, 16)
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, cfg.data.shuffle_rows // self.block_rows))
        self._owner = threading.current_thread()  # the train loop: when it has gone, nobody reads the queue
        threading.Thread(target=self._fetch, args=(shard, epochs), daemon=True, name="genray-rows").start()

    def _fetch(self, shard, epochs: range) -> None:
        try:
            for epoch in epochs:
                seed = int(np.random.default_rng((self.cfg.train.seed, epoch, self.rank)).integers(2 ** 31))
                for block in shard.iter_batches(batch_size=self.block_rows, batch_format="numpy",
                                                local_shuffle_buffer_size=self.cfg.data.shuffle_rows,
                                                local_shuffle_seed=seed, prefetch_batches=1):
                    if not self._put((epoch, block)):
                        return
                if not self._put((epoch, None)):  # the epoch's end
                    return
        except BaseException as err:  # e.g. a read that failed with data.on_error=fail: raised in the loop
            self._put((None, err))

    def _put(self, entry: tuple) -> bool:
        while self._owner.is_alive():
            try:
                self._queue.put(entry, timeout=1.0)
                return True
            except queue.Full:
                continue
        return False

    def rows(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """The row blocks of `epoch` (epochs are read in order: the loop takes each one to its end)."""
        while True:
            got, block = self._queue.get()
            if got is None:
                raise block
            if got != epoch:
                raise RuntimeError(f"training data: expected rows of epoch {epoch}, the shard gave epoch {got}")
            if block is None:
                return
            yield block

    def batches(self, spec, epoch: int, errors: list[str]) -> Iterator[Any]:
        """One epoch as collated batches (the last may be short). Skipped files are appended to `errors`
        ('key: reason') and logged."""
        from torch.utils.data import default_collate

        cfg = self.cfg
        rng = np.random.default_rng((cfg.train.seed, epoch, self.rank, 1))
        pool: list[Any] = []
        batch: list[Any] = []
        # The item buffer starts emitting at an eighth of its size and grows to full size (two items in per item
        # out), as WebDataset's shuffle does: a small epoch would otherwise be read whole before its first step.
        cap = min(cfg.data.shuffle_items, max(cfg.train.batch_size, cfg.data.shuffle_items // 8))

        def emit(item: Any) -> Iterator[Any]:
            batch.append(item)
            if len(batch) == cfg.train.batch_size:
                yield default_collate(batch)
                batch.clear()

        for block in self.rows(epoch):
            for i, key in enumerate(block["key"]):
                if block["error"][i] is not None:
                    errors.append(f"{key}: {block['error'][i]}")
                    print(f"[genray] data: skipping {key}: {block['error'][i]}", flush=True)
                    continue
                image = decode_row({k: block[k][i] for k in ("image", "height", "width", "channels")})
                label = int(block["label"][i])
                for item in prepare_items(spec, image, None if label < 0 else label, cfg.model,
                                          sample_seed(cfg.train.seed, epoch, str(key))):
                    if len(pool) < cap:
                        pool.append(item)
                        continue
                    j = int(rng.integers(len(pool)))  # a full buffer: a random item leaves, the new one stays
                    pool[j], item = item, pool[j]
                    cap = min(cap + 1, cfg.data.shuffle_items)
                    yield from emit(item)
        rng.shuffle(pool)
        for item in pool:
            yield from emit(item)
        if batch:
            yield default_collate(batch)
