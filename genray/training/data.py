"""Training data as a Ray Data dataset: loose images, archives or WebDataset shards, read and decoded by Ray Data
tasks and streamed to the Ray Train workers (`get_dataset_shard`), so no worker ever holds the dataset.

Driver side: `list_units` (what `genray process --input` accepts, via genray.process.read_stage.list_inputs) and
`build_dataset` (units -> shuffled blocks of decoded rows). Worker side: `training_batches` turns the worker's
shard into the family's collated batches (per-image preparation such as random crops runs here, seeded by
(seed, epoch, image key)). Rows: key, image bytes (uint8 HWC) + shape, label (-1: none), error (a skipped file).
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from genray import archives, images, storage
from genray.config import DataConfig, TrainConfig
from genray.datasets import IMAGE_SUFFIXES
from genray.models.data import prepare_items
from genray.process.read_stage import list_inputs, max_member_bytes

READ_THREADS = 8  # loose files read concurrently per read task: object stores reward concurrent requests
ROWS_PER_BLOCK = 32  # decoded images per block out of a read task (a shard streams as several blocks)
MAX_ERROR_KEYS = 20  # keys of skipped files kept per epoch in metrics.jsonl (all are counted and logged)

ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
    ("channels", pa.int32()), ("label", pa.int64()), ("error", pa.string()),
])


class TrainingDataError(ValueError):
    """A training file could not be used and data.on_error is 'fail' (or the data has nothing to train on)."""


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


# ----------------------------------------------------------------------------------------- driver: listing

def list_units(uri: str, data: DataConfig, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """(read units in key order, total bytes listed). A unit is a group of loose files or one archive; keys are
    relative to the prefix (or the pattern's directory), so '<label>/x.png' layouts keep their labels."""
    try:
        inputs = list_inputs(uri)
    except storage.StorageError as err:
        raise TrainingDataError(f"data {err}") from None
    for key, why in inputs.missing:  # a brace pattern naming an object that is not there
        if data.on_error == "fail":
            raise TrainingDataError(f"{inputs.base_uri}/{key}: {why} (data.on_error=fail)")
        print(f"[genray] data: skipping {key}: {why}", flush=True)
    files = sorted(inputs.images, key=lambda o: o.key)
    if limit is not None:
        files = files[:limit]
    units: list[dict[str, Any]] = [
        {"kind": "files", "files": [[o.key, o.uri] for o in files[i:i + data.files_per_read_task]]}
        for i in range(0, len(files), data.files_per_read_task)]
    units += [{"kind": "archive", "key": o.key, "uri": o.uri, "size": o.size, "etag": o.etag}
              for o in sorted(inputs.archives, key=lambda o: o.key)]
    if not units:
        raise TrainingDataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or archives "
                                f"({', '.join(archives.ARCHIVE_SUFFIXES)}) under {uri}")
    return units, sum(o.size or 0 for o in files + inputs.archives)


# ------------------------------------------------------------------------------------ read tasks (no Ray)

def label_of(key: str, sidecars: list[archives.Member] = ()) -> int:
    """A sample's label: from a .cls ('3') or .json ({"label": 3}) sidecar, else a '<label>/' folder; -1: none."""
    for sidecar in sidecars:
        name = sidecar.name.lower()
        try:
            if name.endswith(".cls"):
                return int(sidecar.data.decode().strip())
            if name.endswith(".json"):
                value = json.loads(sidecar.data)
                if isinstance(value, dict) and isinstance(value.get("label"), int):
                    return value["label"]
        except (ValueError, UnicodeDecodeError):
            pass  # a sidecar that is not a label
    parts = key.split("/")
    return int(parts[-2]) if len(parts) >= 2 and parts[-2].isascii() and parts[-2].isdigit() else -1


def _row(key: str, data: bytes | None, label: int, channels: int | None, data_cfg: DataConfig,
         error: str | None = None) -> dict[str, Any]:
    """A decoded image row, or an error row (raised instead with on_error=fail)."""
    if error is None:
        try:
            image = images.decode_image(data, channels=channels, max_pixels=data_cfg.max_pixels)
        except images.ImageError as err:  # undecodable, or larger than max_pixels (the limit is in the message)
            error = f"{err} (data.max_pixels={data_cfg.max_pixels:,})" if isinstance(
                err, images.ImageTooLargeError) else str(err)
        else:
            h, w, c = image.shape
            return {"key": key, "image": image.tobytes(), "height": h, "width": w, "channels": c, "label": label,
                    "error": None}
    if data_cfg.on_error == "fail":
        raise TrainingDataError(f"{key}: {error} (data.on_error=fail)")
    return {"key": key, "image": None, "height": 0, "width": 0, "channels": 0, "label": -1, "error": error}


def unit_rows(unit: dict[str, Any], channels: int | None, data_cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """Every row of one unit, in order: loose files read concurrently; an archive streamed member by member
    through genray.archives (tar-slip refusals, member size bounds), never held whole."""
    if unit["kind"] == "files":
        def read(item: list[str]) -> dict[str, Any]:
            key, uri = item
            try:
                return _row(key, storage.read_bytes(uri), label_of(key), channels, data_cfg)
            except storage.StorageError as err:
                return _row(key, None, -1, channels, data_cfg, error=str(err))

        with ThreadPoolExecutor(READ_THREADS) as pool:
            yield from pool.map(read, unit["files"])
        return
    members = archives.read_members(unit["uri"], max_member_bytes(data_cfg.max_pixels), size=unit["size"],
                                    etag=unit["etag"])
    try:
        for member, sidecars in archives.group_samples(members, is_image):
            key = archives.member_key(unit["key"], member.name)
            yield _row(key, member.data, label_of(member.name, sidecars), channels, data_cfg, error=member.error)
    except archives.ArchiveError as err:  # the members before the failure have been yielded
        yield _row(unit["key"], None, -1, channels, data_cfg, error=str(err))


def read_units(batch: dict[str, np.ndarray], channels: int | None, data: dict[str, Any]) -> Iterator[pa.Table]:
    """Ray Data map_batches generator: units (JSON) -> blocks of at most ROWS_PER_BLOCK decoded rows."""
    data_cfg = DataConfig.model_validate(data)
    for text in batch["unit"]:
        rows = []
        for row in unit_rows(json.loads(text), channels, data_cfg):
            rows.append(row)
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def read_images(uri: str, channels: int | None, data_cfg: DataConfig,
                limit: int | None = None) -> tuple[list[np.ndarray], list[int] | None, list[str]]:
    """Decoded images of a (small) dataset in key order, in this process: held-out data, the fixed sample grid.
    Returns (images, labels or None when any image has none, keys)."""
    units, _ = list_units(uri, data_cfg, limit)
    out, labels, keys = [], [], []
    for unit in units:
        for row in unit_rows(unit, channels, data_cfg):
            if row["error"] is not None:
                print(f"[genray] data: skipping {row['key']}: {row['error']}", flush=True)
                continue
            out.append(decode_row(row))
            labels.append(row["label"])
            keys.append(row["key"])
            if limit is not None and len(out) >= limit:
                return out, (None if -1 in labels else labels), keys
    return out, (None if -1 in labels or not labels else labels), keys


def decode_row(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["image"], dtype=np.uint8).reshape(int(row["height"]), int(row["width"]),
                                                              int(row["channels"]))


# --------------------------------------------------------------------------------------- driver: dataset

def build_dataset(cfg: TrainConfig, channels: int | None):
    """The training set as a Ray Data dataset of decoded rows. Unit (file group / shard) order is reshuffled on
    every execution, i.e. every epoch (reproducibly from train.seed); small datasets (data.materialize) are read
    once and kept in the object store, larger ones are read again each epoch, streaming."""
    import ray.data
    from ray.data import RandomSeedConfig

    units, total_bytes = list_units(cfg.data.uri, cfg.data, cfg.data.limit)
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    materialize = cfg.data.materialize == "always" or (
        cfg.data.materialize == "auto" and total_bytes <= cfg.data.materialize_max_bytes)
    shuffle = RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
    if not materialize and cfg.data.limit is None:
        ds = ds.randomize_block_order(seed=shuffle)  # units are blocks: this shuffles files and shards
    ds = ds.map_batches(read_units, batch_size=1, batch_format="numpy", num_cpus=cfg.data.cpus_per_read_task,
                        fn_kwargs={"channels": channels, "data": cfg.data.model_dump(mode="json")})
    if cfg.data.limit is not None:
        ds = ds.limit(cfg.data.limit)
    if materialize:
        ds = ds.materialize().randomize_block_order(seed=shuffle)
    return ds


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


def training_batches(shard, spec, cfg: TrainConfig, epoch: int, rank: int,
                     errors: list[str]) -> Iterator[Any]:
    """One epoch of this worker's shard as collated training batches of train.batch_size items.

    Rows pass Ray Data's local shuffle buffer (data.shuffle_rows images), each image becomes the family's items
    (prepare_items), and items pass a shuffle buffer of data.shuffle_items, so crops of one photo spread over many
    batches. Skipped files are appended to `errors` ('key: reason') and logged. The last batch may be short."""
    from torch.utils.data import default_collate

    rng = np.random.default_rng((cfg.train.seed, epoch, rank))
    pool: list[Any] = []
    batch: list[Any] = []
    rows = shard.iter_batches(batch_size=min(cfg.data.shuffle_rows, 16), batch_format="numpy",
                              local_shuffle_buffer_size=cfg.data.shuffle_rows,
                              local_shuffle_seed=int(rng.integers(2 ** 31)), prefetch_batches=1)

    def emit(item: Any) -> Iterator[Any]:
        batch.append(item)
        if len(batch) == cfg.train.batch_size:
            yield default_collate(batch)
            batch.clear()

    for block in rows:
        for i, key in enumerate(block["key"]):
            if block["error"][i] is not None:
                errors.append(f"{key}: {block['error'][i]}")
                print(f"[genray] data: skipping {key}: {block['error'][i]}", flush=True)
                continue
            image = decode_row({k: block[k][i] for k in ("image", "height", "width", "channels")})
            label = int(block["label"][i])
            for item in prepare_items(spec, image, None if label < 0 else label, cfg.model,
                                      sample_seed(cfg.train.seed, epoch, str(key))):
                if len(pool) < cfg.data.shuffle_items:
                    pool.append(item)
                    continue
                j = int(rng.integers(len(pool)))  # a full buffer: a random item leaves, the new one takes its place
                pool[j], item = item, pool[j]
                yield from emit(item)
    rng.shuffle(pool)
    for item in pool:
        yield from emit(item)
    if batch:
        yield default_collate(batch)

