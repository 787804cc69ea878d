"""Datasets without downloads: small image sets shipped inside scikit-learn / scikit-image ("embedded"), their
export as PNG files to a local dir or s3:// prefix, the reader for any prefix of image files, and the training
data readers: loose images, archives and WebDataset shards as rows of decoded images (the Ray Data read tasks of
genray.training.data run `read_units`; no torch and no Ray here, so a read worker starts fast).

Images are uint8 (H, W, C) throughout; keys are '/'-separated paths relative to the dataset root.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from genray import archives, images, storage
from genray.config import DataConfig

DATASETS = ("digits", "faces", "photos")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SPLITS = ("train", "test")
NUM_THREADS = 8  # object stores reward concurrent requests; decoding in Pillow releases the GIL

# scikit-image photos and the file each loader reads. Only photos present in the installed package are used:
# a missing file would make skimage try to download it with pooch, and nothing here may download.
_SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "immunohistochemistry": "ihc.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
}
_TEST_PHOTOS = ("chelsea", "flower")


def _split(index: int) -> str:
    # Deterministic and spread over the whole set (load_digits is ordered by writer, lfw by person).
    return "test" if index % 5 == 0 else "train"


def _load_digits() -> tuple[list[np.ndarray], list[int], list[str]]:
    """scikit-learn's 1,797 8x8 digits (values 0..16) made MNIST-like: 20x20 digit centred in 28x28, 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out, keys = [], []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        small = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)[:, :, None]  # (8, 8, 1)
        # (28, 28, 1): the digit at 20x20 with a black border, like MNIST
        out.append(np.pad(images.resize(small, 20, 20), ((4, 4), (4, 4), (0, 0))))
        keys.append(f"{_split(index)}/{int(label)}/{index:04d}.png")
    return out, [int(label) for label in digits.target], keys


def _load_faces() -> tuple[list[np.ndarray], None, list[str]]:
    """The 100 face crops (25x25 gray) of skimage's lfw_subset; its other 100 images are background patches."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # (100, 25, 25) floats in [0, 1]
    out = [np.rint(face * 255.0).astype(np.uint8)[:, :, None] for face in faces]
    return out, None, [f"{_split(index)}/{index:03d}.png" for index in range(len(out))]


def available_photos() -> list[str]:
    """Names of the embedded photos this installation can load without a download."""
    import skimage.data

    package_dir = os.path.dirname(skimage.data.__file__)
    names = [name for name, filename in _SKIMAGE_PHOTOS.items()
             if os.path.exists(os.path.join(package_dir, filename))
             or os.path.exists(os.path.join(skimage.data.data_dir, filename))]
    return names + ["china", "flower"]


def _load_photos() -> tuple[list[np.ndarray], None, list[str]]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in available_photos():
        if name in _SKIMAGE_PHOTOS:
            photos[name] = getattr(skimage.data, name)()
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos[os.path.splitext(os.path.basename(path))[0]] = image  # china.jpg, flower.jpg
    out, keys = [], []
    for name in sorted(photos):
        image = np.asarray(photos[name])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            continue  # only 8-bit RGB photos belong here
        out.append(np.ascontiguousarray(image))
        keys.append(f"{'test' if name in _TEST_PHOTOS else 'train'}/{name}.png")
    return out, None, keys


def load_embedded(name: str) -> tuple[list[np.ndarray], list[int] | None, list[str]]:
    """An embedded dataset as (uint8 HWC images, labels or None, relative keys like 'train/3/0001.png')."""
    loaders = {"digits": _load_digits, "faces": _load_faces, "photos": _load_photos}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return loaders[name]()


def export_dataset(name: str, to_uri: str, split: str | None = None, output_format: str = "files",
                   shard_size: int = 1000) -> list[str]:
    """Write an embedded dataset under to_uri: as PNG files to_uri/<key> ("files"), or as WebDataset shards
    to_uri/shard-NNNNNN.tar of `shard_size` images ("tar": members <key> and, where the set has labels, a
    <key stem>.json sidecar with the label). Returns the written URIs (images or shards) in key order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if output_format not in ("files", "tar"):
        raise ValueError(f"unknown format {output_format!r}; valid formats: files, tar")
    data, labels, keys = load_embedded(name)
    labels = labels if labels is not None else [None] * len(keys)
    items = [(key, image, label) for key, image, label in zip(keys, data, labels)
             if split is None or key.startswith(split + "/")]

    def write(item: tuple[str, np.ndarray, int | None]) -> str:
        uri = storage.join_uri(to_uri, item[0])
        storage.write_bytes(uri, images.encode_png(item[1]))
        return uri

    def encode(item: tuple[str, np.ndarray, int | None]) -> list[tuple[str, bytes]]:
        key, image, label = item
        files = [(key, images.encode_png(image))]
        if label is not None:
            files.append((key.rsplit(".", 1)[0] + ".json", json.dumps({"label": int(label)}).encode()))
        return files

    with ThreadPoolExecutor(NUM_THREADS) as pool:
        if output_format == "files":
            return list(pool.map(write, items))
        writer = archives.ShardWriter(to_uri, shard_size)
        for files in pool.map(encode, items):
            writer.add(files)
        writer.close()
        return writer.written


def export_digits_sample(to_uri: str, num_train: int = 64, num_test: int = 16) -> str:
    """The first num_train / num_test embedded digits under <to_uri>/{train,test}/<label>/ (smoke runs); returns
    to_uri."""
    budget = {"train": num_train, "test": num_test}
    digits, _, keys = load_embedded("digits")
    for image, key in zip(digits, keys):
        split = key.split("/")[0]
        if budget[split] > 0:
            storage.write_bytes(storage.join_uri(to_uri, key), images.encode_png(image))
            budget[split] -= 1
    return to_uri


def read_image_prefix(uri: str, channels: int | None = None,
                      limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Every image under a prefix, sorted by key, as (uint8 HWC images, keys relative to the prefix).

    Training data must be clean, so one undecodable file fails the whole read with its key in the message.
    """
    objects = storage.list_objects(uri, suffixes=IMAGE_SUFFIXES)
    if not objects:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {uri}")
    if limit is not None:
        objects = objects[:limit]

    def read(obj: storage.ObjectInfo) -> np.ndarray:
        data = storage.read_bytes(obj.uri)
        try:
            return images.decode_image(data, channels=channels)
        except images.ImageTooLargeError as e:
            raise images.ImageTooLargeError(f"{obj.key}: {e}", e.width, e.height, e.max_pixels) from None
        except images.ImageError as e:
            raise images.ImageError(f"{obj.key}: {e}") from None

    with ThreadPoolExecutor(NUM_THREADS) as pool:
        decoded = list(pool.map(read, objects))
    return decoded, [obj.key for obj in objects]


def labels_from_keys(keys: list[str]) -> list[int] | None:
    """Integer labels from the folder holding each file ('<split>/<label>/<file>' or '<label>/<file>', as
    export_dataset('digits') writes them); None when any key does not follow that layout."""
    labels = []
    for key in keys:
        parts = key.split("/")
        if len(parts) < 2 or not (parts[-2].isascii() and parts[-2].isdigit()):
            return None
        labels.append(int(parts[-2]))
    return labels or None


# ------------------------------------------------------------------------------ training data: rows of images

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


READ_THREADS = 8  # loose files read concurrently per read task: object stores reward concurrent requests
ROWS_PER_BLOCK = 32  # decoded images per block out of a read task (a shard streams as several blocks)

ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
    ("channels", pa.int32()), ("label", pa.int64()), ("error", pa.string()),
])


class TrainingDataError(ValueError):
    """A training file could not be used and data.on_error is 'fail' (or the data has nothing to train on)."""


# ----------------------------------------------------------------------------------------- driver: listing

def list_units(uri: str, data: DataConfig, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """(read units in key order, total bytes listed). A unit is a group of loose files or one archive; keys are
    relative to the prefix (or the pattern's directory), so '<label>/x.png' layouts keep their labels."""
    from genray.process.read_stage import list_inputs  # it imports this module: not at the top

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
    from genray.process.read_stage import max_member_bytes

    members = archives.read_members(unit["uri"], max_member_bytes(data_cfg.max_pixels), size=unit["size"],
                                    etag=unit["etag"])
    try:
        for member, sidecars in archives.group_samples(members, _is_image):
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
