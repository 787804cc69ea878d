"""genray.images: safe decoding of every format we accept, the float rule, grids, and exact tiling."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import uniform_filter

from genray import images
from genray.images import ImageError, ImageTooLargeError

from helpers import image_bytes, png_chunk


def _rgb(height=24, width=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit RGB) but which carries only one row of pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --- decoding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP_LOSSLESS"])
def test_decode_lossless_formats_exact(fmt):
    array = _rgb()
    data = image_bytes(Image.fromarray(array), "WEBP", lossless=True) if fmt == "WEBP_LOSSLESS" else \
        image_bytes(Image.fromarray(array), fmt)
    out = images.decode_image(data)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_decode_lossy_formats_close(fmt):
    array = np.zeros((32, 48, 3), np.uint8)
    array[:, :24] = (200, 30, 30)
    out = images.decode_image(image_bytes(Image.fromarray(array), fmt, quality=95))
    assert out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - array).mean() < 6


def test_decode_gif_first_frame_palette_to_rgb():
    frames = [Image.new("RGB", (16, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = images.decode_image(data)
    assert out.shape == (8, 16, 3)
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    # Palette images keep 3 channels even with channels=None.
    assert images.decode_image(data, channels=None).shape == (8, 16, 3)


def test_decode_grayscale_channels():
    gray = _rgb()[:, :, 0]
    data = image_bytes(Image.fromarray(gray, "L"), "PNG")
    assert images.decode_image(data, channels=None).shape == (24, 32, 1)
    np.testing.assert_array_equal(images.decode_image(data, channels=1)[:, :, 0], gray)
    rgb = images.decode_image(data, channels=3)
    assert rgb.shape == (24, 32, 3) and np.all(rgb == gray[:, :, None])


def test_decode_rgb_to_one_channel():
    data = image_bytes(Image.new("RGB", (5, 4), (255, 255, 255)), "PNG")
    out = images.decode_image(data, channels=1)
    assert out.shape == (4, 5, 1) and np.all(out == 255)
    assert images.decode_image(data, channels=None).shape == (4, 5, 3)


def test_decode_bilevel_to_gray():
    data = image_bytes(Image.new("1", (6, 3), 1), "PNG")
    out = images.decode_image(data, channels=None)
    assert out.shape == (3, 6, 1) and np.all(out == 255)


def test_decode_rgba_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (255, 0, 0, 255)  # opaque red
    rgba[2:] = (0, 0, 0, 0)  # fully transparent black -> white
    out = images.decode_image(image_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[3, 3], (255, 255, 255))


def test_decode_gray_alpha_stays_gray():
    la = Image.new("LA", (3, 3), (0, 0))
    out = images.decode_image(image_bytes(la, "PNG"), channels=None)
    assert out.shape == (3, 3, 1) and np.all(out == 255)


def test_decode_palette_with_transparency():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    out = images.decode_image(image_bytes(im, "PNG", transparency=0))
    np.testing.assert_array_equal(out[0, 0], (0, 255, 0))
    np.testing.assert_array_equal(out[1, 1], (255, 255, 255))  # transparent index -> white


def test_decode_16_bit_scaled():
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = images.decode_image(image_bytes(Image.fromarray(wide), "PNG"), channels=None)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 1)
    np.testing.assert_array_equal(out[0, :, 0], (0, 100, 255))


def test_decode_cmyk_jpeg():
    data = image_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=100)
    out = images.decode_image(data)
    assert out.shape == (8, 8, 3) and out.min() > 245


def test_decode_exif_orientation_applied():
    # Stored 64 wide x 32 high, red on the left; orientation 6 means "rotate 90 degrees clockwise to display".
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32] = (255, 0, 0)
    array[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = image_bytes(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    out = images.decode_image(data)
    assert out.shape == (64, 32, 3)
    assert out[:32, :, 0].mean() > 200 and out[32:, :, 2].mean() > 200  # red on top after rotation
    assert images.read_image_size(data) == (64, 32)  # stored size; the header is not rotated


def test_zero_bytes():
    with pytest.raises(ImageError, match="empty file"):
        images.decode_image(b"")
    with pytest.raises(ImageError, match="empty file"):
        images.read_image_size(b"")


def test_random_bytes_not_an_image():
    junk = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not an image"):
        images.decode_image(junk)


def test_truncated_png():
    data = image_bytes(Image.fromarray(_rgb(64, 64)), "PNG")
    with pytest.raises(ImageError) as info:
        images.decode_image(data[: len(data) // 2])
    assert "\n" not in str(info.value)
    assert "truncated" in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt TIFF EXIF
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_truncation_is_an_image_error(fmt):
    # Whatever the cut, the caller sees an ImageError (or a decoded image), never a Pillow exception.
    data = image_bytes(Image.fromarray(_rgb(16, 16)), fmt)
    for cut in range(0, len(data), max(1, len(data) // 40)):
        try:
            out = images.decode_image(data[:cut])
        except ImageError as e:
            assert str(e) and "\n" not in str(e)
        else:
            assert out.ndim == 3 and out.dtype == np.uint8


def test_too_large_checked_from_header_before_decoding():
    # 9000 x 9000 = 81 M pixels: over our 64 M default, under Pillow's own bomb limit; only a header, no pixels.
    header = _png_header(9000, 9000)
    assert images.read_image_size(header) == (9000, 9000)
    with pytest.raises(ImageTooLargeError, match="9000x9000") as info:
        images.decode_image(header)
    assert (info.value.width, info.value.height, info.value.max_pixels) == (9000, 9000, images.DEFAULT_MAX_PIXELS)
    # Far above Pillow's decompression-bomb limit: still our error type, not Pillow's.
    with pytest.raises(ImageTooLargeError):
        images.decode_image(_png_header(100_000, 100_000))
    # A real image with a small cap.
    with pytest.raises(ImageTooLargeError, match="limit 100"):
        images.decode_image(image_bytes(Image.fromarray(_rgb()), "PNG"), max_pixels=100)


def test_too_large_is_an_image_error():
    assert issubclass(ImageTooLargeError, ImageError) and issubclass(ImageError, ValueError)


def test_bad_channels_argument():
    with pytest.raises(ValueError, match="channels"):
        images.decode_image(image_bytes(Image.fromarray(_rgb()), "PNG"), channels=4)


# --- encoding and the float rule --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3)])
def test_encode_png_round_trip(shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = images.decode_image(images.encode_png(array), channels=None)
    np.testing.assert_array_equal(out.reshape(shape), array)


def test_encode_png_rejects_bad_input():
    with pytest.raises(ValueError):
        images.encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        images.encode_png(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="JPEG has no alpha"):
        images.encode_image(np.zeros((4, 4, 4), np.uint8), "jpeg")


def test_alpha_round_trips_through_png_and_webp():
    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), np.uint8)
    assert np.array_equal(images.decode_image(images.encode_png(rgba), alpha=True), rgba)
    webp = images.decode_image(images.encode_image(rgba, "webp", quality=100), alpha=True)
    assert webp.shape == (6, 5, 4) and np.array_equal(webp[:, :, 3], rgba[:, :, 3])  # WebP keeps alpha exactly


@pytest.mark.parametrize("value_range,low,high", [("tanh", -1.0, 1.0), ("sigmoid", 0.0, 1.0)])
def test_float_round_trip_exact(value_range, low, high):
    batch = np.arange(256, dtype=np.uint8).reshape(2, 8, 16, 1).repeat(3, axis=3)  # every value, NHWC
    x = images.to_float(batch, value_range)
    assert x.dtype == np.float32 and x.shape == (2, 3, 8, 16)
    assert x.min() == low and x.max() == high
    np.testing.assert_array_equal(images.to_uint8(x, value_range), batch)


def test_to_uint8_clips_and_rounds():
    x = np.array([-5.0, -1.0, 0.0, 0.999, 1.0, 7.0], np.float32).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(images.to_uint8(x, "tanh").ravel(), [0, 0, 128, 255, 255, 255])
    np.testing.assert_array_equal(images.to_uint8(x, "sigmoid").ravel(), [0, 0, 0, 255, 255, 255])


def test_unknown_value_range():
    with pytest.raises(ValueError, match="tanh"):
        images.to_float(np.zeros((1, 2, 2, 1), np.uint8), "relu")


# --- grids ------------------------------------------------------------------------------------------------

def test_make_grid_shape_and_mixed_channels():
    items = [np.zeros((8, 6, 1), np.uint8)] * 4 + [np.zeros((8, 6, 3), np.uint8)]
    grid = images.make_grid(items, nrow=3, padding=2)
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (6 + 2) + 2, 3) and grid.dtype == np.uint8
    assert np.all(grid[0] == 255) and np.all(grid[2:10, 2:8] == 0)
    assert images.make_grid(np.zeros((2, 4, 4, 1), np.uint8), nrow=8, padding=0).shape == (4, 8, 1)


# --- tiling -----------------------------------------------------------------------------------------------

def test_tile_positions_cover_and_end_flush():
    assert images.tile_positions(10, 10, 32, 8) == [(0, 0)]
    positions = images.tile_positions(100, 70, 32, 8)
    ys = sorted({y for y, _ in positions})
    xs = sorted({x for _, x in positions})
    assert ys == [0, 24, 48, 68] and xs == [0, 24, 38]
    with pytest.raises(ValueError):
        images.tile_positions(10, 10, 8, 8)


def test_split_tiles_sizes():
    tiles, positions = images.split_tiles(np.zeros((40, 20, 3), np.float32), tile=32, overlap=4)
    assert positions == [(0, 0), (8, 0)]
    assert all(t.shape == (32, 20, 3) for t in tiles)


@pytest.mark.parametrize("height,width,tile,overlap", [(37, 53, 16, 4), (64, 64, 16, 0), (20, 90, 32, 7),
                                                      (9, 9, 32, 8), (50, 31, 10, 9)])
def test_stitch_split_identity_exact(height, width, tile, overlap):
    x = np.random.default_rng(2).integers(0, 256, (height, width, 3)).astype(np.float32)
    tiles, positions = images.split_tiles(x, tile, overlap)
    out = images.stitch_tiles(tiles, positions, height, width, scale=1, overlap=overlap)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)
    # Arbitrary floats: equal up to float32 rounding.
    y = np.random.default_rng(5).standard_normal((height, width, 2)).astype(np.float32)
    tiles, positions = images.split_tiles(y, tile, overlap)
    out = images.stitch_tiles(tiles, positions, height, width, scale=1, overlap=overlap)
    np.testing.assert_allclose(out, y, rtol=1e-6, atol=1e-6)


def test_stitch_split_nearest_upscale_exact():
    x = np.random.default_rng(3).random((41, 29, 3), dtype=np.float32)
    tiles, positions = images.split_tiles(x, tile=12, overlap=4)
    upscaled = [t.repeat(2, axis=0).repeat(2, axis=1) for t in tiles]  # the "model": nearest-neighbour x2
    out = images.stitch_tiles(upscaled, positions, 82, 58, scale=2, overlap=4)
    np.testing.assert_allclose(out, x.repeat(2, axis=0).repeat(2, axis=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size,overlap", [(5, 8), (5, 12), (9, 16)])
def test_stitch_conv_matches_whole_image(size, overlap):
    # A box blur of width `size` has radius size // 2; overlap >= 4 * radius keeps every weighted pixel exact.
    x = np.random.default_rng(4).random((70, 90, 3)).astype(np.float32)
    blur = lambda a: uniform_filter(a, size=(size, size, 1), mode="reflect")  # noqa: E731
    tiles, positions = images.split_tiles(x, tile=32, overlap=overlap)
    assert len(positions) > 4
    out = images.stitch_tiles([blur(t) for t in tiles], positions, 70, 90, scale=1, overlap=overlap)
    whole = blur(x)
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-5)


def test_stitch_feathers_a_seam():
    # Two tiles whose "model" adds a different constant: the overlap blends smoothly instead of jumping.
    x = np.zeros((1, 40, 1), np.float32)
    tiles, positions = images.split_tiles(x, tile=24, overlap=8)
    outs = [t + 10.0 * i for i, t in enumerate(tiles)]
    row = images.stitch_tiles(outs, positions, 1, 40, scale=1, overlap=8)[0, :, 0]
    assert row[0] == 0 and row[-1] == 10
    assert np.all(np.diff(row) >= 0) and np.max(np.diff(row)) < 10 / 3


def test_stitch_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        images.stitch_tiles([np.zeros((4, 4, 1))], [(0, 0), (0, 4)], 4, 8, 1, 0)
    with pytest.raises(ValueError):
        images.stitch_tiles([np.zeros((4, 4, 1))], [(0, 8)], 4, 8, 1, 0)
