"""Gatys style transfer as a bulk-job engine: the same shape as the Predictor (a callable on a list of uint8 HWC
images, with a `digest`), so `genray process style --style-image URI` runs through the same Ray Data job as the
model artefacts. One optimisation per image; slow by nature, so it reports per-image progress.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Callable

import numpy as np

from genray import storage
from genray.config import ProcessConfig
from genray.images import ImageError, decode_image, resize, resize_side
from genray.models.style_net import GATYS_LAYERS, gatys_transfer
from genray.models.vgg import VGGFeatures, load_vgg19_features

PROGRESS_STEPS = 10  # progress lines per image


class StyleImageError(ValueError):
    """The style image cannot be read or decoded: the job as a whole cannot run."""


def read_style(cfg: ProcessConfig) -> tuple[np.ndarray, bytes]:
    """(uint8 RGB style image, its raw bytes) from cfg.style_image_uri, with a message that names the URI."""
    try:
        data = storage.read_bytes(cfg.style_image_uri)
        return decode_image(data, channels=3, max_pixels=cfg.max_pixels), data
    except (storage.StorageError, ImageError) as err:
        raise StyleImageError(f"style image {cfg.style_image_uri}: {err}") from None


def load_gatys_vgg(cfg: ProcessConfig) -> tuple[VGGFeatures, str]:
    """VGG19 features for Gatys, following DESIGN.md's lookup (vgg_weights URI -> torchvision cache -> download)."""
    return load_vgg19_features(GATYS_LAYERS, cfg.vgg_weights, cfg.allow_untrained_vgg, cfg.vgg_download)


def gatys_digest(style_bytes: bytes, vgg_source: str, cfg: ProcessConfig) -> str:
    """What `model_digest` means for a Gatys job: the style image, the VGG weights' source and the settings.
    Changing any of them redoes every image on the next run, as a new model artefact would."""
    recipe = {"method": "gatys", "style_sha256": hashlib.sha256(style_bytes).hexdigest(), "vgg": vgg_source,
              "iterations": cfg.gatys_iterations, "max_side": cfg.gatys_max_side}
    return "sha256:" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


class GatysStylizer:
    """Callable on a list of uint8 HWC images -> stylised uint8 images of the same shape."""

    task = "style"
    scale = 1

    def __init__(self, cfg: ProcessConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.style, style_bytes = read_style(cfg)
        self.vgg, source = load_gatys_vgg(cfg)
        self.digest = gatys_digest(style_bytes, source, cfg)

    def __call__(self, images: list[np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
        names = names or [f"image {i}" for i in range(len(images))]
        return [self._one(image, name) for image, name in zip(images, names)]

    def _one(self, image: np.ndarray, name: str) -> np.ndarray:
        h, w = image.shape[:2]
        # The optimisation's cost grows with the pixel count: large photos are optimised at gatys_max_side and
        # the result is resized back, so a 24-megapixel photo takes minutes, not hours.
        small = resize_side(image, self.cfg.gatys_max_side, longer=True) if max(h, w) > self.cfg.gatys_max_side else image
        every = max(1, self.cfg.gatys_iterations // PROGRESS_STEPS)
        started = time.perf_counter()

        def progress(iteration: int, loss: float) -> None:
            if iteration % every == 0 or iteration == self.cfg.gatys_iterations:
                self.log(f"[genray] gatys {name}: {iteration}/{self.cfg.gatys_iterations} loss={loss:.4g} "
                         f"({time.perf_counter() - started:.1f}s)")

        out = gatys_transfer(small, self.style, self.vgg, iterations=self.cfg.gatys_iterations, progress=progress)
        return resize(out, w, h)
