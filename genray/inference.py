"""Predictor: a model artefact turned into a function on uint8 images. No Ray in here.

Ray Data actors (bulk jobs) and Serve replicas both wrap this class, so loading, channel handling, padding,
tiling and the uint8 <-> float rule (genray.images.to_float / to_uint8, per the family's value range) exist once.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genray.model_artifact import load_artifact
from genray.images import TileCanvas, split_tiles, to_float, to_uint8


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_device(want_gpu: bool, log=print) -> torch.device:
    """The device of a worker Ray granted GPUs to (or not): cuda:0 is the GPU Ray assigned (Ray sets
    CUDA_VISIBLE_DEVICES per actor), and a node that declares GPUs but has no CUDA falls back to CPU, loudly."""
    if not want_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    log("[genray] this worker was given a GPU share but CUDA is not available here: running on CPU")
    return torch.device("cpu")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Plane:
    """The model's output for one image (or one channel plane of it), filled in as its tiles come back.

    A single-tile plane keeps its one output. A tiled plane blends each tile into a TileCanvas as soon as the
    tile's batch is done, so only the canvas and one batch of tile outputs are ever held; the finished plane is
    cropped and converted to uint8 at once, so float canvases do not pile up across the images of a call.
    """

    def __init__(self, height: int, width: int, padded: tuple[int, int], num_tiles: int, scale: int,
                 overlap: int, to_grey: bool, value_range: str):
        self.height, self.width, self.padded, self.remaining = height, width, padded, num_tiles
        self.scale, self.overlap, self.to_grey, self.value_range = scale, overlap, to_grey, value_range
        self.canvas: TileCanvas | None = None
        self.pixels: np.ndarray | None = None  # uint8 (height * scale, width * scale, C) once every tile is in

    def add(self, output: np.ndarray, position: tuple[int, int]) -> None:
        """output: float32 (h * scale, w * scale, C_model) in the model's value range."""
        self.remaining -= 1
        if self.remaining == 0 and self.canvas is None:  # the whole plane in one piece
            return self._finish(output)
        if self.canvas is None:
            ph, pw = self.padded
            self.canvas = TileCanvas(ph * self.scale, pw * self.scale, output.shape[2], self.scale, self.overlap)
        self.canvas.add(output, position)
        if self.remaining == 0:
            self._finish(self.canvas.result())
            self.canvas = None

    def _finish(self, result: np.ndarray) -> None:
        result = result[: self.height * self.scale, : self.width * self.scale]  # drop the padded border
        if self.to_grey:  # an RGB model on a grey image: back to one channel, averaged before rounding
            result = result.mean(axis=2, keepdims=True)
        self.pixels = to_uint8(result.transpose(2, 0, 1)[None], self.value_range)[0]


@dataclass
class _Piece:
    """One model input: a tile (or a whole plane) of one image, with the plane its output belongs to."""

    plane: _Plane
    position: tuple[int, int]  # tile corner (y, x) in input pixels
    pixels: np.ndarray  # uint8 (h, w, C_model)


class Predictor:
    """Callable on a list of uint8 HWC images (C = 1 or 3), returning uint8 HWC images of the same channel count.

    Images larger than `tile` are cut into overlapping tiles; tiles of all images in one call are batched
    through the model together and stitched back with feathered seams.
    """

    def __init__(
        self,
        spec,
        cfg,
        model: torch.nn.Module,
        meta: dict[str, Any],
        device: torch.device,
        tile: int = 512,
        tile_overlap: int = 16,
        batch_size: int = 8,
        autocast: bool = True,
        precision: str | None = None,
    ):
        if tile <= 2 * tile_overlap:
            raise ValueError(f"tile ({tile}) must be larger than twice the overlap ({tile_overlap})")
        # A strided model is shift-equivariant only by multiples of its size multiple, so tile corners must sit
        # on that grid or a tile's pixels differ from the whole-image pass: tile down, overlap up to multiples.
        m = spec.size_multiple
        tile, tile_overlap = tile // m * m, -(-tile_overlap // m) * m
        if tile <= 2 * tile_overlap:
            raise ValueError(f"tile ({tile}) must be larger than twice the overlap ({tile_overlap}) "
                             f"once both are rounded to multiples of {m}")
        # Channels-last (NHWC) activations: oneDNN's CPU convolutions run 20-30 % faster on SRResNet and DnCNN
        # (benchmarks/bulk_superres.py's forward ceiling went from 3.83 to 4.69 images/s) and cuDNN prefers them
        # under autocast; the module is converted in place (outputs are identical up to float rounding).
        self.spec, self.cfg, self.model, self.meta = spec, cfg, model.to(memory_format=torch.channels_last), meta
        self.device, self.tile, self.tile_overlap, self.batch_size = device, tile, tile_overlap, batch_size
        self.channels = spec.in_channels(cfg)
        # The forward's autocast dtype (None: float32). precision None: bf16 on GPUs, where it pays off; float32 on
        # CPUs, where reduced precision is usually slower for small convs. An explicit precision is used as given.
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        if precision is None:
            precision = "bf16" if autocast and device.type == "cuda" else "fp32"
        self.precision, self.autocast_dtype = precision, PRECISIONS[precision]

    @classmethod
    def from_uri(cls, uri: str, device: str | torch.device | None = None, **kwargs) -> "Predictor":
        device = torch.device(device) if device is not None else default_device()
        spec, cfg, model, meta = load_artifact(uri, device)
        return cls(spec, cfg, model, meta, device, **kwargs)

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def scale(self) -> int:
        return self.spec.scale

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        planes_per_image: list[list[_Plane]] = []
        pieces: list[_Piece] = []
        for image in images:
            planes = []
            for pixels in self._planes(image):
                h, w = pixels.shape[:2]
                # Pad the plane (as the whole-image pass would) so every tile corner is a multiple of size_multiple.
                padded = self._padded_size(pixels)
                tiles, positions = split_tiles(_pad_to(pixels, *padded), self.tile, self.tile_overlap)
                plane = _Plane(h, w, padded, len(tiles), self.scale, self.tile_overlap,
                               to_grey=image.shape[2] == 1 and self.channels == 3, value_range=self.spec.value_range)
                planes.append(plane)
                pieces += [_Piece(plane, pos, t) for t, pos in zip(tiles, positions)]
            planes_per_image.append(planes)
        self._run(pieces)
        return [np.concatenate([p.pixels for p in planes], axis=2) if len(planes) > 1 else planes[0].pixels
                for planes in planes_per_image]

    # -- steps of __call__ ---------------------------------------------------------------------------------

    def _planes(self, image: np.ndarray) -> list[np.ndarray]:
        """Fit the image's channels to the model: 1-channel models see each RGB plane on its own (colour kept)."""
        if image.ndim != 3 or image.dtype != np.uint8 or image.shape[2] not in (1, 3):
            raise ValueError(f"expected a uint8 HWC image with 1 or 3 channels, got {image.dtype} {image.shape}")
        c = image.shape[2]
        if c == self.channels:
            return [image]
        if self.channels == 1:
            return [image[:, :, k : k + 1] for k in range(c)]
        return [np.repeat(image, self.channels, axis=2)]  # grey image into an RGB model

    def _run(self, pieces: list[_Piece]) -> None:
        """Forward every piece, batching pieces of equal (padded) size together, in image order, so each image's
        tiles finish close together and its canvas is freed before the next image's grows."""
        groups: dict[tuple[int, int], list[_Piece]] = defaultdict(list)
        for piece in pieces:
            groups[self._padded_size(piece.pixels)].append(piece)
        for (ph, pw), group in groups.items():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                # Symmetric padding up to the model's size multiple; the padded border is cropped after.
                batch = np.stack([_pad_to(p.pixels, ph, pw) for p in chunk])
                out = self._forward(batch)  # (B, C, ph*s, pw*s) float32
                s = self.scale
                for piece, y in zip(chunk, out):
                    h, w = piece.pixels.shape[:2]
                    piece.plane.add(np.ascontiguousarray(y[:, : h * s, : w * s].transpose(1, 2, 0)), piece.position)

    def _padded_size(self, pixels: np.ndarray) -> tuple[int, int]:
        m = self.spec.size_multiple
        h, w = pixels.shape[:2]
        return -(-h // m) * m, -(-w // m) * m

    @torch.inference_mode()
    def _forward(self, batch_uint8: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(to_float(batch_uint8, self.spec.value_range)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            y = self.model(x)
        return y.float().cpu().numpy()


def _pad_to(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Symmetric padding at the bottom and right up to (height, width); the padded border is cropped after."""
    h, w = pixels.shape[:2]
    if (h, w) == (height, width):
        return pixels
    return np.pad(pixels, ((0, height - h), (0, width - w), (0, 0)), mode="symmetric")
