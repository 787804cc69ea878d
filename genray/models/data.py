"""Training datasets built from decoded images: the default (one float tensor per image) and random crops."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from genray.images import to_float
from genray.models.spec import ModelSpec


def image_tensor_dataset(images: list[np.ndarray], value_range: str, labels: list[int] | None = None) -> Dataset:
    """Same-size images as float tensors (C, H, W) in `value_range`; with labels, items are (image, label)."""
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"training images must share one size for this model, found {sorted(shapes)[:4]}")
    x = torch.from_numpy(to_float(np.stack(images), value_range))
    if labels is None:
        return _SingleTensor(x)
    return TensorDataset(x, torch.as_tensor(labels, dtype=torch.long))


class _SingleTensor(Dataset):
    """Items are bare tensors (not 1-tuples), so train_step gets a (B, C, H, W) batch."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class RandomCrops(Dataset):
    """`crops_per_image` random crop_size² crops of each image per epoch (photos of any size), float in value_range.

    Crops are drawn from a generator seeded by (seed, index, epoch) so runs are reproducible across workers.
    With augment, each crop is also rotated by a random multiple of 90 degrees and maybe mirrored (the 8
    symmetries of the square): eight times the distinct patches from a handful of photos.
    """

    def __init__(self, images: list[np.ndarray], crop_size: int, value_range: str, crops_per_image: int = 16,
                 seed: int = 0, augment: bool = False):
        small = [im.shape for im in images if min(im.shape[:2]) < crop_size]
        if small:
            raise ValueError(f"images smaller than crop_size={crop_size}: {small[:3]}")
        self.images, self.crop_size, self.value_range = images, crop_size, value_range
        self.crops_per_image, self.seed, self.epoch, self.augment = crops_per_image, seed, 0, augment

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * self.crops_per_image

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i // self.crops_per_image]
        rng = np.random.default_rng((self.seed, i, self.epoch))
        h, w = image.shape[:2]
        y, x = rng.integers(0, h - self.crop_size + 1), rng.integers(0, w - self.crop_size + 1)
        crop = image[y : y + self.crop_size, x : x + self.crop_size]  # (S, S, C)
        if self.augment:
            crop = np.rot90(crop, k=int(rng.integers(4)))
            if rng.integers(2):
                crop = crop[:, ::-1]
            crop = np.ascontiguousarray(crop)
        return torch.from_numpy(to_float(crop[None], self.value_range)[0])


def build_dataset(spec: ModelSpec, images: list[np.ndarray], labels: list[int] | None, cfg: Any) -> Dataset:
    if spec.make_dataset is not None:
        return spec.make_dataset(images, labels, cfg)
    return image_tensor_dataset(images, spec.value_range)


def prepare_items(spec: ModelSpec, image: np.ndarray, label: int | None, cfg: Any, seed: int) -> list[Any]:
    """The training items one decoded image gives (its random crops, LR/HR pairs, the image as a tensor, with its
    label ...), through the family's own make_dataset, as the streaming side prepares them.

    `seed` picks the random crops: a dataset with set_epoch (RandomCrops, and what wraps it) draws item i from
    (its seed, i, epoch), so `seed` goes in as the epoch word. The caller derives it from (train seed, epoch,
    image key): an image gets the same crops in a rerun whichever worker reads it, and new ones every epoch."""
    dataset = build_dataset(spec, [image], None if label is None else [label], cfg)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(seed)
    return [dataset[i] for i in range(len(dataset))]


def fixed_batch(dataset: Dataset, n: int) -> Any:
    """n items spread over the dataset (key-sorted data is often class-sorted), collated like a training batch."""
    from torch.utils.data import default_collate

    step = max(1, len(dataset) // n)
    return default_collate([dataset[i] for i in range(0, len(dataset), step)][:n])
