"""Every input a bulk job may meet: decode_image over the formats and modes test_images.py leaves out, then one
real denoise job (local Ray, local S3) over a prefix of one file per format plus a corpus of bad files."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow.dataset as pds
import pytest
from PIL import Image, ImageFile, features

from genray import images, storage
from genray.process.job import run_process_job
from genray.config import ProcessConfig
from genray.images import ImageError, ImageTooLargeError, decode_image
from helpers import image_bytes, png_chunk

HAS_WEBP = features.check("webp")
needs_webp = pytest.mark.skipif(not HAS_WEBP, reason="Pillow built without WebP")

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --- building inputs in memory ------------------------------------------------------------------------------

def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour); `rows` are filter-type-prefixed scanlines."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def _png_16bit(pixels: np.ndarray) -> bytes:
    """uint16 (H, W, 3) -> 16-bit RGB PNG, (H, W, 4) -> 16-bit RGBA PNG."""
    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return _png(width, height, 16, {3: 2, 4: 6}[channels], rows)


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG header (correct CRCs) declaring width x height 8-bit RGB, carrying one row of pixels only."""
    return _png(width, height, 8, 2, b"\x00" * (1 + 3 * width))


def _blocks(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB image of flat random 16x16 blocks: one block per 4:2:0 macroblock, so JPEG and WebP keep it
    within a few levels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (-(-height // 16), -(-width // 16), 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(16, axis=0).repeat(16, axis=1)[:height, :width])


def _over_white(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What compositing over white should give, in float: value * a + 255 * (1 - a)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return value.astype(np.float64) * a + 255.0 * (1.0 - a)


def _palette_png(transparent: bool) -> bytes:
    im = Image.new("P", (5, 3), 1)
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 128, 255] + [0] * (768 - 9))
    im.putpixel((0, 0), 0)
    im.putpixel((4, 2), 2)
    return image_bytes(im, "PNG", **({"transparency": 1} if transparent else {}))


def _palette_expected(opaque) -> np.ndarray:
    """_palette_png decoded: index 1 everywhere (shown as `opaque`), index 0 top-left, index 2 bottom-right."""
    expected = np.full((3, 5, 3), opaque, np.uint8)
    expected[0, 0], expected[2, 4] = (10, 20, 30), (0, 128, 255)
    return expected


def _gif_animated() -> bytes:
    """Three frames; the first is left half green, right half magenta, the later ones solid red and blue."""
    first = np.zeros((6, 10, 3), np.uint8)
    first[:, :5] = GREEN
    first[:, 5:] = (255, 0, 255)
    frames = [Image.fromarray(first)] + [Image.new("RGB", (10, 6), c) for c in (RED, BLUE)]
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _gif_transparent() -> bytes:
    im = Image.new("P", (6, 4), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 1), 1)
    return image_bytes(im, "GIF", transparency=0)


def _exif_jpeg(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())


def _corner_marked(height: int = 32, width: int = 48) -> np.ndarray:
    """Grey, with a red 16x16 block at the stored top-left corner."""
    array = np.full((height, width, 3), 90, np.uint8)
    array[:16, :16] = RED
    return array


# --- decode_image: cases test_images.py does not cover -------------------------------------------------------
# Each case: (bytes, channels, expected uint8 array, tolerance in levels). Lossless cases are exact.

def _cases():
    rgb16 = np.array([[[65535, 0, 0], [0, 257 * 128, 65535], [1000, 30000, 65535]]], np.uint16)
    rgba16 = np.array([[[65535, 0, 0, 65535], [0, 0, 0, 0]]], np.uint16)  # opaque red, transparent black
    gray16 = np.array([[0, 257 * 100, 65535, 1000], [257, 512, 40000, 65534]], np.uint16)
    la = np.array([[[0, 255], [0, 0], [200, 128], [0, 64]]], np.uint8)
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
    gray = np.random.default_rng(1).integers(0, 256, (12, 20), dtype=np.uint8)
    flat_gray = np.full((16, 16), 77, np.uint8)

    def scaled(wide):  # 16-bit -> 8-bit the way a viewer shows it
        return np.rint(wide / 257.0).astype(np.uint8)

    # Pillow keeps only the high byte of 16-bit colour (v >> 8), one level below rint(v / 257) at worst.
    yield "png-16bit-rgb", _png_16bit(rgb16), None, scaled(rgb16), 1
    yield "png-16bit-rgba", _png_16bit(rgba16), 3, np.array([[RED, WHITE]], np.uint8), 0
    yield "tiff-16bit-gray", image_bytes(Image.fromarray(gray16), "TIFF"), None, scaled(gray16)[:, :, None], 0
    yield "tiff-16bit-gray-big-endian", image_bytes(Image.frombytes("I;16B", (4, 2), gray16.astype(">u2").tobytes()),
                                              "TIFF"), None, scaled(gray16)[:, :, None], 0
    yield "tiff-rgba", image_bytes(Image.fromarray(rgba, "RGBA"), "TIFF"), 3, np.rint(
        _over_white(rgba[..., :3], rgba[..., 3])).astype(np.uint8), 1
    yield "tiff-cmyk", image_bytes(Image.new("CMYK", (3, 2), (0, 255, 255, 0)), "TIFF"), None, np.full(
        (2, 3, 3), RED, np.uint8), 0
    yield "png-palette-opaque", _palette_png(transparent=False), None, _palette_expected(opaque=(200, 100, 50)), 0
    yield "png-palette-transparent", _palette_png(transparent=True), None, _palette_expected(opaque=WHITE), 0
    yield "png-la-partial-alpha", image_bytes(Image.fromarray(la, "LA"), "PNG"), None, np.rint(
        _over_white(la[..., :1], la[..., 1])).astype(np.uint8), 1
    yield "png-rgba-partial-alpha", image_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), 3, np.rint(
        _over_white(rgba[..., :3], rgba[..., 3])).astype(np.uint8), 1
    yield "bmp-gray", image_bytes(Image.fromarray(gray, "L"), "BMP"), None, gray[:, :, None], 0
    yield "jpeg-gray", image_bytes(Image.fromarray(flat_gray, "L"), "JPEG", quality=95), None, flat_gray[:, :, None], 2
    yield "jpeg-cmyk-colour", image_bytes(Image.new("CMYK", (16, 16), (255, 0, 255, 0)), "JPEG", quality=100), 3, \
        np.full((16, 16, 3), GREEN, np.uint8), 3
    yield "gif-animated-first-frame", _gif_animated(), 3, np.concatenate(
        [np.full((6, 5, 3), GREEN, np.uint8), np.full((6, 5, 3), (255, 0, 255), np.uint8)], axis=1), 0
    yield "gif-transparent-background", _gif_transparent(), None, np.array(
        [[WHITE] * 6, [WHITE, BLUE] + [WHITE] * 4] + [[WHITE] * 6] * 2, np.uint8), 0
    if HAS_WEBP:
        yield "webp-lossless-rgba", image_bytes(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True), 3, \
            np.rint(_over_white(rgba[..., :3], rgba[..., 3])).astype(np.uint8), 1


CASES = list(_cases())


@pytest.mark.parametrize("data,channels,expected,tolerance", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decode_table(data, channels, expected, tolerance):
    out = decode_image(data, channels=channels)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.astype(int), expected.astype(int), rtol=0, atol=tolerance)


@needs_webp
def test_decode_webp_lossy_rgb():
    array = _blocks(24, 40, seed=2)
    out = decode_image(image_bytes(Image.fromarray(array), "WEBP", quality=95))
    assert out.shape == (24, 40, 3) and np.abs(out.astype(int) - array).mean() < 6


def test_gif_input_really_is_animated():
    with Image.open(io.BytesIO(_gif_animated())) as im:
        assert im.n_frames == 3  # so the table case above proves "first frame", not "the only frame"


# EXIF orientation -> how the stored pixels must be transformed for display (TIFF/EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise to display
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise to display
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_every_value(orientation):
    stored = _blocks(32, 48, seed=orientation)
    out = decode_image(_exif_jpeg(stored, orientation))
    expected = ORIENTATIONS[orientation](stored)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).mean() < 4
    if orientation != 1 and out.shape == stored.shape:  # the check can tell a wrong orientation from a right one
        assert np.abs(out.astype(int) - stored).mean() > 20


@pytest.mark.parametrize("orientation,corner", [(6, "top-right"), (8, "bottom-left")])
def test_exif_rotation_moves_the_marked_corner(orientation, corner):
    out = decode_image(_exif_jpeg(_corner_marked(), orientation))  # stored 32 high x 48 wide
    assert out.shape == (48, 32, 3)
    corners = {"top-left": out[:16, :16], "top-right": out[:16, -16:],
               "bottom-left": out[-16:, :16], "bottom-right": out[-16:, -16:]}
    for name, block in corners.items():
        is_red = block[..., 0].mean() > 200 and block[..., 1:].mean() < 60
        assert is_red == (name == corner), name


# --- bad headers: specific reasons, no pixels decoded --------------------------------------------------------

def test_huge_header_names_its_size_and_the_limit_without_decoding(monkeypatch):
    # 10 G pixels: far above Pillow's own decompression-bomb cap, which used to hide the dimensions.
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    header = _png_header(100_000, 100_000)
    with pytest.raises(ImageTooLargeError) as info:  # no_decoding above proves no pixel was decoded
        decode_image(header, max_pixels=1_000_000)
    assert "100000x100000" in str(info.value) and "limit 1,000,000" in str(info.value)
    assert (info.value.width, info.value.height, info.value.max_pixels) == (100_000, 100_000, 1_000_000)
    assert images.read_image_size(header) == (100_000, 100_000)


def test_max_pixels_alone_caps_the_size():
    # 200 M pixels is above Pillow's global cap (~179 M); a caller allowing more must still get the header read.
    assert images.read_image_size(_png_header(20_000, 10_000)) == (20_000, 10_000)


def _noise(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF directory
@pytest.mark.parametrize("data,reason", [
    pytest.param(_gif_animated()[:40], "truncated or corrupt GIF file", id="gif-cut-in-header"),
    pytest.param(image_bytes(Image.fromarray(_blocks(16, 16, 0)), "JPEG")[:20], "truncated or corrupt JPEG file",
                 id="jpeg-cut-in-header"),
    pytest.param(b"II*\x00" + _noise(500, 3), "truncated or corrupt TIFF file", id="tiff-signature-then-noise"),
    pytest.param(_noise(500, 4), "not an image", id="noise"),
    pytest.param(b"a shopping list, not a picture\n", "not an image", id="text"),
])
def test_damaged_header_reason_names_the_format(data, reason):
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert str(info.value).startswith(reason) and "\n" not in str(info.value)


# --- one real bulk job over every format and every kind of bad file -----------------------------------------

def _good_inputs() -> dict[str, bytes]:
    """One file per format and mode, of mixed sizes, under the keys a user might have."""
    rgba = np.zeros((20, 26, 4), np.uint8)
    rgba[:, :13] = (200, 40, 40, 255)
    la = np.zeros((18, 12, 2), np.uint8)
    la[:9] = (60, 255)
    gray16 = np.random.default_rng(5).integers(0, 65536, (22, 15), dtype=np.uint16)
    files = {
        "rgb.png": image_bytes(Image.fromarray(_blocks(24, 32, 1)), "PNG"),
        "photos/shot.jpg": image_bytes(Image.fromarray(_blocks(30, 41, 2)), "JPEG", quality=90),
        "photos/legacy.bmp": image_bytes(Image.fromarray(_blocks(17, 23, 3)), "BMP"),
        "scans/page.tif": image_bytes(Image.fromarray(_blocks(40, 28, 4)), "TIFF"),
        "scans/deep.tiff": image_bytes(Image.fromarray(gray16), "TIFF"),  # 16-bit grayscale ('I;16')
        "deep.png": _png_16bit(np.random.default_rng(6).integers(0, 65536, (13, 19, 3), dtype=np.uint16)),
        "anim.gif": _gif_animated(),
        "palette.png": _palette_png(transparent=False),
        "palette-alpha.png": _palette_png(transparent=True),
        "alpha/la.png": image_bytes(Image.fromarray(la, "LA"), "PNG"),
        "alpha/rgba.png": image_bytes(Image.fromarray(rgba, "RGBA"), "PNG"),
        "gray.png": image_bytes(Image.fromarray(_blocks(28, 28, 7)[:, :, 0], "L"), "PNG"),
        "print.jpeg": image_bytes(Image.new("CMYK", (21, 14), (30, 200, 10, 20)), "JPEG", quality=90),
        "phone/rotated.jpg": _exif_jpeg(_corner_marked(), 6),  # stored 32x48, shown 48x32
    }
    if HAS_WEBP:
        files["web/pic.webp"] = image_bytes(Image.fromarray(_blocks(20, 36, 8)), "WEBP", quality=90)
    return files


def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    """key -> (bytes, what the error reason must say)."""
    png = image_bytes(Image.fromarray(_blocks(40, 40, 9)), "PNG")
    jpeg = image_bytes(Image.fromarray(_blocks(40, 40, 10)), "JPEG", quality=90)
    gif = bytearray(image_bytes(Image.fromarray(_blocks(24, 24, 11)).convert("P"), "GIF"))
    middle = len(gif) // 2
    gif[middle:-1] = _noise(len(gif) - 1 - middle, 12)  # the LZW body replaced by noise; the trailer kept
    return {
        "bad/zero.png": (b"", "empty file"),
        "bad/truncated.png": (png[: len(png) // 2], "truncated"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad/notes.jpg": (b"Meeting notes: bring the slides.\n", "not an image"),
        "bad/huge.png": (_png_header(100_000, 100_000), "too large: 100000x100000"),
        "bad/broken.gif": (bytes(gif), "corrupt"),
        "bad/noise.tif": (_noise(4096, 13), "not an image"),
    }


def _read_manifest_table(output_uri: str):
    fs, path = storage.pyarrow_filesystem(f"{output_uri}/_manifest")
    return pds.dataset(path, filesystem=fs, format="parquet").to_table()


def test_bulk_job_over_every_format_and_bad_file(ray_local, tiny_model, s3_bucket):
    _, trained = tiny_model
    good, bad = _good_inputs(), _bad_inputs()
    inputs, out = f"{s3_bucket}/in", f"{s3_bucket}/out"
    for key, data in good.items():
        storage.write_bytes(f"{inputs}/{key}", data)
    for key, (data, _) in bad.items():
        storage.write_bytes(f"{inputs}/{key}", data)

    cfg = ProcessConfig(task="denoise", input_uri=inputs, output_uri=out, model_uri=trained.model_uri,
                        batch_size=4, max_pixels=1_000_000)
    summary = run_process_job(cfg, log=lambda _: None)
    assert summary.counts == {"ok": len(good), "error": len(bad), "skipped": 0}

    rows = {r["input_key"]: r for r in _read_manifest_table(out).to_pylist()}
    assert len(rows) == len(good) + len(bad) and set(rows) == set(good) | set(bad)  # one row per input

    expected_outputs = set()
    for key, data in good.items():
        row, source = rows[key], decode_image(data, channels=None)
        out_key = key.rsplit(".", 1)[0] + ".png"
        assert (row["status"], row["error"], row["output_key"]) == ("ok", None, out_key), key
        assert (row["width"], row["height"]) == (source.shape[1], source.shape[0]), key
        written = storage.read_bytes(f"{out}/{out_key}")
        assert written.startswith(b"\x89PNG\r\n\x1a\n"), key
        assert decode_image(written, channels=None).shape == source.shape, key  # the denoiser keeps the size
        expected_outputs.add(out_key)
    assert rows["phone/rotated.jpg"]["width"] == 32 and rows["phone/rotated.jpg"]["height"] == 48  # EXIF applied

    for key, (_, reason) in bad.items():
        row = rows[key]
        assert row["status"] == "error" and row["output_key"] is None, key
        assert reason in row["error"], (key, row["error"])
        assert "\n" not in row["error"] and len(row["error"]) < 200, (key, row["error"])
    assert "limit 1,000,000" in rows["bad/huge.png"]["error"]

    written_keys = {o.key for o in storage.list_objects(out) if not o.key.startswith("_manifest/")}
    assert written_keys == expected_outputs  # nothing at all for the bad inputs
