"""`genray process ... --preview N`: the first N inputs through the job's own model and output settings, on this
machine (no Ray), as one before/after contact sheet to look at before starting a large job. Nothing is written
under the output prefix and no manifest row is made: the job itself still does every input."""
from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from genray import archives, storage
from genray.config import ProcessConfig
from genray.images import ImageError, decode_image, encode_image, make_grid, resize

CELL = 256  # each before/after image is fitted into a CELL x CELL square of the sheet


def _inputs(cfg: ProcessConfig) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of the job's inputs in listing order: loose images, and archives' image members."""
    from genray.process import job, read_stage

    limits = read_stage.archive_limits(cfg)
    max_bytes = cfg.max_input_bytes or read_stage.max_member_bytes(cfg.max_pixels)
    _, pages, _ = job._input_pages(cfg.input_uri)
    for page in pages:
        for obj in page:
            if archives.is_archive(obj.key):
                try:
                    for member in archives.read_members(obj.uri, limits, size=obj.size, etag=obj.etag,
                                                        wanted=read_stage._wanted):
                        if read_stage.is_image(member.name) and member.data is not None:
                            yield archives.member_key(obj.key, member.name), member.data
                except archives.ArchiveError:
                    continue  # the job will make its error row; a preview shows what works
            elif obj.size is None or obj.size <= max_bytes:
                yield obj.key, storage.read_bytes(obj.uri, max_bytes=max_bytes)


def _fit(image: np.ndarray) -> np.ndarray:
    """RGB on a white CELL x CELL square, the image as large as fits (aspect kept; alpha over white)."""
    if image.shape[2] in (2, 4):
        rgb, alpha = image[:, :, :-1].astype(np.float32), image[:, :, -1:].astype(np.float32) / 255
        image = np.rint(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    h, w = image.shape[:2]
    scale = CELL / max(h, w)
    # Small inputs are enlarged without smoothing so their pixels stay visible next to the model's output.
    method = Image.Resampling.BICUBIC if scale < 1 else Image.Resampling.NEAREST
    fitted = resize(image, max(1, round(w * scale)), max(1, round(h * scale)), method)
    cell = np.full((CELL, CELL, 3), 255, np.uint8)
    y, x = (CELL - fitted.shape[0]) // 2, (CELL - fitted.shape[1]) // 2
    cell[y:y + fitted.shape[0], x:x + fitted.shape[1]] = fitted
    return cell


def run_preview(cfg: ProcessConfig, count: int, to_uri: str, log: Callable[[str], Any] = print) -> str:
    """Write the contact sheet (a PNG: one row per input, before | after) to `to_uri`; returns it."""
    from genray.process.job import JobError, colour, finish

    if cfg.model_uri is None:
        from genray.process.gatys import GatysStylizer

        stylizer = GatysStylizer(cfg)
        predictor, scale = functools.partial(stylizer, names=["preview"]), stylizer.scale
    else:
        from genray.inference import Predictor

        model = Predictor.from_uri(cfg.model_uri, tile=cfg.tile, tile_overlap=cfg.tile_overlap,
                                   batch_size=cfg.forward_batch_size or cfg.batch_size, precision=cfg.precision)
        predictor, scale = model, model.scale
    cells: list[np.ndarray] = []
    for key, data in itertools.islice(_inputs(cfg), count):
        try:
            image = decode_image(data, channels=None, max_pixels=cfg.max_pixels, alpha=cfg.keeps_alpha)
            out = finish(cfg, scale, image, predictor([colour(image)])[0])
        except (ImageError, ValueError, RuntimeError) as err:
            log(f"[genray] preview: {key}: {err}")
            continue
        cells += [_fit(image), _fit(out)]
        log(f"[genray] preview: {key} {image.shape[1]}x{image.shape[0]} -> {out.shape[1]}x{out.shape[0]}")
    if not cells:
        raise JobError(f"--preview: no usable image among the first {count} inputs under {cfg.input_uri}")
    storage.write_bytes(to_uri, encode_image(make_grid(cells, nrow=2, padding=4)))
    return to_uri
