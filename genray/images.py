"""Images at the edges of genray: safe decoding of untrusted bytes, PNG/JPEG/WebP encoding with provenance metadata,
the uint8 HWC <-> float NCHW rule, sample grids, and overlapping tiles with feathered seam blending for models run on
large images.

numpy + Pillow only: this module is imported by workers, replicas and the CLI alike.
"""

from __future__ import annotations

import io
import math
import re
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

DEFAULT_MAX_PIXELS = 64_000_000
VALUE_RANGES = ("tanh", "sigmoid")


class ImageError(ValueError):
    """An input is not a usable image; the message is a short, user-facing reason."""


class ImageTooLargeError(ImageError):
    """The header declares more pixels than allowed; raised before any pixel is decoded."""

    def __init__(self, message: str, width: int | None = None, height: int | None = None,
                 max_pixels: int | None = None):
        super().__init__(message)
        self.width, self.height, self.max_pixels = width, height, max_pixels


# The formats bulk jobs promise to read (genray.datasets.IMAGE_SUFFIXES), by Pillow's plugin names.
PROMISED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")


def _open(data: bytes) -> Image.Image:
    """Image.open on bytes: parses the header only; pixels are decoded later by .load()."""
    if not data:
        raise ImageError("empty file")
    try:
        # Only the promised formats' plugins may parse untrusted bytes (Pillow otherwise tries every plugin it has:
        # PSD, EPS via Ghostscript, FITS, ... each with its own memory behaviour).
        return Image.open(io.BytesIO(data), formats=PROMISED_FORMATS)
    except Image.DecompressionBombError as e:
        # Pillow's global cap (2 * Image.MAX_IMAGE_PIXELS, ~179 M) fires inside Image.open, before our max_pixels
        # check can: parse the header again without it, so max_pixels alone decides and the error names the size.
        return _open_without_pillow_cap(data, e)
    except Image.UnidentifiedImageError:
        # Image.open only says that no plugin took the bytes. If they start like a format we promise, the file is
        # a damaged one of that format (typically cut short inside its header), not "not an image".
        name = _signature_format(data)
        raise ImageError(f"truncated or corrupt {name} file (unreadable header)" if name
                         else "not an image (unrecognised format)") from None
    except Exception as e:  # any parser failure on a header means the bytes are not a usable image
        raise ImageError(_reason(e)) from None


def _signature_format(data: bytes) -> str | None:
    """The promised format whose signature `data` starts with, by Pillow's own check; None if none matches."""
    Image.init()  # registers every plugin, as Image.open does
    for name in PROMISED_FORMATS:
        accept = Image.OPEN.get(name, (None, None))[1]
        try:
            if accept is not None and accept(data[:16]) is True:  # a str is Pillow's "plugin not installed"
                return name
        except Exception:  # noqa: BLE001 - a plugin's check choking on odd bytes is just "no match"
            continue
    return None


def _open_without_pillow_cap(data: bytes, bomb: Image.DecompressionBombError) -> Image.Image:
    """The header parsed by its format's plugin directly, skipping Image.open's decompression-bomb check.
    Safe because every caller checks max_pixels before any pixel is decoded."""
    name = _signature_format(data)
    if name is not None:
        try:
            return Image.OPEN[name][0](io.BytesIO(data), "")
        except Exception:  # noqa: BLE001 - fall back to what Pillow told us
            pass
    found = re.search(r"\((\d+) pixels\)", str(bomb))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    raise ImageTooLargeError(f"image too large: {pixels}") from None


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return "truncated image"
    return f"corrupt image ({text[:120]})"


def read_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only; no pixels are decoded."""
    with _open(data) as im:
        return im.size


def decode_image(data: bytes, channels: int | None = 3, max_pixels: int = DEFAULT_MAX_PIXELS,
                 alpha: bool = False) -> np.ndarray:
    """Decode untrusted image bytes to uint8 (H, W, C).

    channels=3 -> RGB, 1 -> L, None -> 1 for grayscale sources and 3 for everything else. EXIF orientation is
    applied, GIFs give their first frame, alpha is composited over white (with `alpha`, an image that has an alpha
    channel keeps it instead, as one more channel last: (H, W, C + 1), colours not composited), 16-bit is scaled
    to 8-bit. Every failure is an ImageError (ImageTooLargeError when the header declares more than max_pixels).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    im = _open(data)
    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageError(f"empty image ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image too large: {width}x{height} = {width * height:,} pixels, limit {max_pixels:,}",
                width, height, max_pixels)
        try:
            im.load()  # the first frame for animated formats; truncation and corruption surface here
        except Exception as e:
            raise ImageError(_reason(e)) from None
        try:
            # A broken EXIF block should not cost the user their image: keep it unrotated instead.
            # Only when there is something to undo: exif_transpose copies the whole image otherwise.
            if im.getexif().get(0x0112, 1) != 1:  # EXIF Orientation
                im = ImageOps.exif_transpose(im) or im
        except Exception:
            pass
        array = _to_uint8_array(im, alpha)
    if array.shape[2] in (2, 4):  # colour + alpha: convert the colour channels, keep the alpha
        colour = _convert_channels(array[:, :, :-1], channels)
        return np.ascontiguousarray(np.concatenate([colour, array[:, :, -1:]], axis=2))
    return np.ascontiguousarray(_convert_channels(array, channels))


def _convert_channels(array: np.ndarray, channels: int | None) -> np.ndarray:
    if channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 1 and array.shape[2] == 3:
        array = np.asarray(Image.fromarray(array, "RGB").convert("L"))[:, :, None]  # ITU-R 601 luma
    return array


def _to_uint8_array(im: Image.Image, keep_alpha: bool = False) -> np.ndarray:
    """Any Pillow mode -> uint8 (H, W, 1) for grayscale sources, (H, W, 3) otherwise; with keep_alpha, an image
    with alpha gives (H, W, 2) or (H, W, 4) (unpremultiplied colour, then alpha)."""
    mode = im.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        base = "L" if mode.startswith("L") else "RGB"
        rgba = im.convert("RGBA")  # 'La'/'RGBa' (premultiplied) are unpremultiplied by this conversion
        if keep_alpha:
            array = np.asarray(rgba, dtype=np.uint8)
            return np.ascontiguousarray(array[:, :, [0, 3]] if base == "L" else array)
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im, mode = Image.alpha_composite(white, rgba).convert(base), base
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG/TIFF); 'I' is how Pillow widens it, so it carries the same 0..65535 range.
        return _rows_to_uint8(im, lambda block: np.clip(block, 0, 65535) / np.float32(257.0))
    if mode == "F":
        peak = max(np.nanmax(block, initial=0.0) for block in _bands(im))
        scale = np.float32(255.0) if peak <= 1.0 else np.float32(1.0)  # [0, 1] floats are common
        return _rows_to_uint8(im, lambda block: np.clip(np.nan_to_num(block * scale), 0, 255))
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)[:, :, None]
    if mode != "RGB":  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


# Rows converted at once from 16-bit/float images: the float32 temporaries stay a few MB whatever the image size
# (converting whole images in float64 took ~40 bytes per pixel: 2.5 GB for a 64 MP float TIFF).
_CONVERT_PIXELS = 1 << 20


def _bands(im: Image.Image):
    """float32 (rows, W) bands of a one-band 16-bit/32-bit/float image, a few MB each (np.asarray of the whole
    image would hold two more copies of it: Pillow's tobytes pieces and their join)."""
    width, height = im.size
    step = max(1, _CONVERT_PIXELS // max(width, 1))
    for y in range(0, height, step):
        yield np.asarray(im.crop((0, y, width, min(height, y + step)))).astype(np.float32)


def _rows_to_uint8(im: Image.Image, to_range) -> np.ndarray:
    """A one-band 16-bit/32-bit/float image -> uint8 (H, W, 1), a band of rows at a time; to_range maps a float32
    band to [0, 255]. Peak memory: Pillow's image, the uint8 output and one band."""
    width, height = im.size
    out = np.empty((height, width, 1), dtype=np.uint8)
    y = 0
    for block in _bands(im):
        out[y:y + block.shape[0], :, 0] = np.rint(to_range(block)).astype(np.uint8)
        y += block.shape[0]
    return out


# Output formats by name -> MIME type (Serve negotiates with these; "jpg" is accepted as an alias of "jpeg").
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = 90  # JPEG / WebP; Pillow's own defaults (75 / 80) show artefacts on model outputs
# Where provenance goes in JPEG / WebP: an XMP packet with one attribute per key in this namespace (PNG: text chunks).
XMP_NAMESPACE = "urn:genray:provenance:1"


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes."""
    return encode_image(image, "png")


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = DEFAULT_QUALITY,
                 metadata: dict[str, str] | None = None) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3), or with alpha last (H, W, 2) or (H, W, 4) -> PNG, JPEG or WebP bytes
    (`quality` for the lossy two; JPEG has no alpha).

    `metadata` (e.g. provenance: {"genray:model": ..., ...}) is written as PNG text chunks, and for JPEG / WebP as
    an XMP packet (read back with read_metadata) plus EXIF Software / ImageDescription, which most viewers show."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"encode_image needs uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    modes = {2: "LA", 3: "RGB", 4: "RGBA"}
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in modes)):
        raise ValueError(f"encode_image needs (H, W) or (H, W, C) with C in 1..4, got {image.shape}")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"format must be one of {sorted(OUTPUT_FORMATS)}, got {fmt!r}")
    mode = "L" if image.ndim == 2 else modes[image.shape[2]]
    if fmt == "jpeg" and mode in ("LA", "RGBA"):
        raise ValueError("JPEG has no alpha channel: composite the image first (or write PNG / WebP)")
    if fmt == "webp" and mode == "LA":  # WebP has no grey modes
        image, mode = np.concatenate([np.repeat(image[:, :, :1], 3, axis=2), image[:, :, 1:]], axis=2), "RGBA"
    pil = Image.fromarray(np.ascontiguousarray(image), mode)
    metadata = metadata or {}
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)  # tEXt, or iTXt for text outside Latin-1
        # Level 3 is several times faster than Pillow's default 6 for a few percent more bytes.
        pil.save(buffer, format="PNG", compress_level=3, pnginfo=info)
    else:
        extra = {}
        if metadata:
            exif = Image.Exif()
            exif[0x0131] = f"genray {metadata.get('genray:version', '')}".strip()  # Software
            exif[0x010E] = "; ".join(f"{k}={v}" for k, v in metadata.items())  # ImageDescription
            extra = {"exif": exif.tobytes(), "xmp": _xmp_packet(metadata)}
        # WebP has no grey mode: Pillow stores grey images as RGB there (decode them with channels=1 to get one back).
        pil.save(buffer, format=fmt.upper(), quality=quality, **extra)
    return buffer.getvalue()


def _xmp_packet(metadata: dict[str, str]) -> bytes:
    attributes = " ".join(f"genray:{_xmp_name(key)}={quoteattr(value)}" for key, value in metadata.items())
    return (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:genray="{XMP_NAMESPACE}" {attributes}/></rdf:RDF></x:xmpmeta>'
            ).encode()


def _xmp_name(key: str) -> str:
    """A metadata key as an XML attribute name in the genray namespace ("genray:model-digest" -> "model-digest")."""
    name = key.split(":", 1)[1] if key.startswith("genray:") else key
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"metadata key {key!r} is not usable as an XMP name")
    return name


def read_metadata(data: bytes) -> dict[str, str]:
    """The metadata encode_image wrote: PNG text chunks, or the genray attributes of a JPEG / WebP XMP packet (as
    "genray:<name>" keys). Trusted-enough input only (our own outputs, tests): it parses XML with the stdlib."""
    import xml.etree.ElementTree as ET

    with _open(data) as im:
        if im.format == "PNG":
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
        xmp = im.info.get("xmp")
    if not xmp:
        return {}
    prefix = "{" + XMP_NAMESPACE + "}"
    found = {}
    for element in ET.fromstring(xmp).iter():
        found.update({f"genray:{k[len(prefix):]}": v for k, v in element.attrib.items() if k.startswith(prefix)})
    return found


def resize(image: np.ndarray, width: int, height: int, method: Image.Resampling = Image.Resampling.BICUBIC,
           channels: int | None = None) -> np.ndarray:
    """uint8 HWC (C = 1 or 3) -> uint8 (height, width, channels) with PIL, the resampler users' own scripts reach
    for; `channels` converts grey <-> RGB on the way. The one place that knows PIL wants grey images as planes."""
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    if channels is not None and channels != image.shape[2]:
        pil = pil.convert("L" if channels == 1 else "RGB")
    if pil.size != (width, height):
        pil = pil.resize((width, height), method)
    out = np.asarray(pil, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def resize_side(image: np.ndarray, side: int, longer: bool = False) -> np.ndarray:
    """Bicubic resize keeping the aspect ratio, so that the shorter (or, with `longer`, the longer) side is `side`."""
    h, w = image.shape[:2]
    scale = side / (max(h, w) if longer else min(h, w))
    least = 1 if longer else side  # rounding must not leave the shorter side under `side`
    width, height = max(least, round(w * scale)), max(least, round(h * scale))
    return image if (width, height) == (w, h) else resize(image, width, height)


# The one place the pixel-value rule is written: uint8 at the edges, float32 inside models,
# in [-1, 1] for models ending in tanh and [0, 1] for models ending in sigmoid.
def center_crop(image: np.ndarray, max_side: int, multiple: int = 1) -> np.ndarray:
    """The central crop of at most max_side per side, each side a multiple of `multiple` (held-out evaluation)."""
    h, w = image.shape[:2]
    ch, cw = min(h, max_side) // multiple * multiple, min(w, max_side) // multiple * multiple
    y, x = (h - ch) // 2, (w - cw) // 2
    return image[y : y + ch, x : x + cw]


def _check_range(value_range: str) -> None:
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")


def to_float(images: np.ndarray, value_range: str) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] ('tanh') or [0, 1] ('sigmoid')."""
    _check_range(value_range)
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"to_float needs (N, H, W, C), got {images.shape}")
    x = images.transpose(0, 3, 1, 2).astype(np.float32)
    x = x / np.float32(127.5) - np.float32(1.0) if value_range == "tanh" else x / np.float32(255.0)
    return np.ascontiguousarray(x)


def to_uint8(images: np.ndarray, value_range: str) -> np.ndarray:
    """float (N, C, H, W) -> uint8 (N, H, W, C), clipped and rounded."""
    _check_range(value_range)
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"to_uint8 needs (N, C, H, W), got {x.shape}")
    x = (x + 1.0) * 127.5 if value_range == "tanh" else x * 255.0
    x = np.rint(np.clip(np.nan_to_num(x), 0, 255)).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def make_grid(images: list[np.ndarray] | np.ndarray, nrow: int, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """Same-size uint8 images -> one uint8 (H, W, C) grid with `nrow` images per row (torchvision's meaning)."""
    items = [np.asarray(im) for im in images]
    if not items:
        raise ValueError("make_grid needs at least one image")
    items = [im[:, :, None] if im.ndim == 2 else im for im in items]
    height, width = items[0].shape[:2]
    if any(im.shape[:2] != (height, width) for im in items):
        raise ValueError("make_grid needs images of one size")
    channels = 3 if any(im.shape[2] == 3 for im in items) else 1
    items = [np.repeat(im, 3, axis=2) if im.shape[2] != channels else im for im in items]
    num_cols = max(1, min(nrow, len(items)))
    num_rows = math.ceil(len(items) / num_cols)
    grid = np.full((num_rows * (height + padding) + padding, num_cols * (width + padding) + padding, channels),
                   pad_value, dtype=np.uint8)
    for i, im in enumerate(items):
        y = padding + (i // num_cols) * (height + padding)
        x = padding + (i % num_cols) * (width + padding)
        grid[y:y + height, x:x + width] = im
    return grid


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if tile >= length:
        return [0]
    # Regular stride, then one tile flush with the far edge (it may overlap its neighbour by more than `overlap`).
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def tile_positions(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x), row-major, of tiles of size `tile` overlapping by at least `overlap`."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    return [(y, x) for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]


def split_tiles(image: np.ndarray, tile: int, overlap: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """(H, W, C) image -> tiles of min(tile, H) x min(tile, W) (views) and their corners (y, x)."""
    height, width = image.shape[:2]
    positions = tile_positions(height, width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    return [image[y:y + th, x:x + tw] for y, x in positions], positions


def _edge_weights(size: int, ramp: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    """1-D weights for one tile axis: 0 in the outer quarter of an interior overlap (where a conv model sees the
    tile's edge instead of real context), a linear ramp across its middle half, 1 elsewhere and at image edges."""
    weights = np.ones(size, dtype=np.float64)
    if ramp <= 0:
        return weights
    margin = ramp // 4
    position = np.arange(size, dtype=np.float64)
    rising = np.clip((position - margin + 0.5) / (ramp - 2 * margin), 0.0, 1.0)
    if fade_in:
        weights = np.minimum(weights, rising)
    if fade_out:
        weights = np.minimum(weights, rising[::-1])
    return weights


def _hwc(tile: np.ndarray) -> np.ndarray:
    tile = np.asarray(tile, dtype=np.float32)
    return tile[:, :, None] if tile.ndim == 2 else tile


class TileCanvas:
    """Blends model outputs of split_tiles into one float32 (out_height, out_width, C) image, one tile at a time,
    so a caller can drop each tile's output as soon as it is added (memory: the canvas plus one batch of tiles).

    Tiles are float (h * scale, w * scale, C) at the input-space corners from split_tiles. Overlaps are feathered,
    so there is no seam. Exact for pointwise models; for a conv model of receptive-field radius r (in output
    pixels) the result equals the whole-image output when r <= overlap * scale // 4.
    """

    def __init__(self, out_height: int, out_width: int, channels: int, scale: int, overlap: int):
        self.height, self.width, self.scale, self.ramp = out_height, out_width, scale, overlap * scale
        # float32 accumulators: the output of a x4 model on a large photo is already hundreds of MB.
        self.total = np.zeros((out_height, out_width, channels), dtype=np.float32)
        self.weight_sum = np.zeros((out_height, out_width, 1), dtype=np.float32)

    def add(self, tile: np.ndarray, position: tuple[int, int]) -> None:
        tile = _hwc(tile)
        th, tw = tile.shape[:2]
        y0, x0 = position[0] * self.scale, position[1] * self.scale
        if y0 + th > self.height or x0 + tw > self.width:
            raise ValueError(f"tile at {position} of {th}x{tw} (scale {self.scale}) falls outside "
                             f"{self.height}x{self.width}")
        wy = _edge_weights(th, self.ramp, fade_in=y0 > 0, fade_out=y0 + th < self.height)
        wx = _edge_weights(tw, self.ramp, fade_in=x0 > 0, fade_out=x0 + tw < self.width)
        # Weights in multiples of 1/256 keep every product and sum exact in float32 for 8-bit-valued pixels,
        # so a pointwise model stitches back bit-exactly; the ramp is still smooth to 0.4 %.
        weight = (np.round(np.outer(wy, wx) * 256.0) / 256.0).astype(np.float32)[:, :, None]  # (h, w, 1)
        self.total[y0:y0 + th, x0:x0 + tw] += tile * weight
        self.weight_sum[y0:y0 + th, x0:x0 + tw] += weight

    def result(self) -> np.ndarray:
        if not np.all(self.weight_sum > 0):
            raise ValueError("tiles do not cover the output image")
        self.total /= self.weight_sum
        return self.total


def stitch_tiles(tiles: list[np.ndarray], positions, out_height: int, out_width: int, scale: int,
                 overlap: int) -> np.ndarray:
    """All tiles at once through a TileCanvas (see there)."""
    if len(tiles) != len(positions) or not tiles:
        raise ValueError(f"need one position per tile, got {len(tiles)} tiles and {len(positions)} positions")
    canvas = TileCanvas(out_height, out_width, _hwc(tiles[0]).shape[2], scale, overlap)
    for tile, position in zip(tiles, positions):
        canvas.add(tile, position)
    return canvas.result()
