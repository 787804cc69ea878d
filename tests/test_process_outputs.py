"""Output options of `genray process` (Real-ESRGAN's): --ext png|jpg|webp with --quality (output keys and the
manifest follow the extension), --outscale (any final scale: the model's x4, then Lanczos), alpha kept around the
model (or composited with --alpha composite, as jpg outputs always are); through the real CLI and S3 server."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from genray import storage
from genray.images import decode_image, encode_image, read_metadata
from genray.process import job, manifest

from helpers import genray, read_manifest_table


def test_output_keys_follow_the_extension():
    taken: set[str] = set()
    assert [manifest.output_key_for(k, taken, ".webp") for k in ("a/b.jpg", "a/b.webp", "a/c.tif")] == \
        ["a/b.webp", "a/b.webp.webp", "a/c.webp"]
    assert manifest.member_output_key("x/s.tar", "m/1.png", set(), ".jpg") == "x/s.tar/m/1.jpg"
    # The Arrow fast path of planning gives the same keys as one by one.
    keys = sorted(["p/1.png", "p/1.jpg", "p/2.JPEG", "q/3.tif", "q/4.webp"])
    outs, _ = job._OutputKeys(".jpg").page(keys, pa.array(keys, pa.string()))
    one_by_one = job._OutputKeys(".jpg")
    assert outs == [one_by_one(k) for k in keys] and "p/1.jpg" in outs and "q/3.jpg" in outs


def _rgba(height: int, width: int) -> np.ndarray:
    """A colour gradient whose alpha ramps from transparent (left) to opaque (right)."""
    yy, xx = np.mgrid[0:height, 0:width]
    colour = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 128)], -1)
    alpha = (xx * 255 // (width - 1))[..., None]
    return np.concatenate([colour, alpha], -1).astype(np.uint8)


def _lanczos(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.LANCZOS))


@pytest.mark.integration
def test_ext_quality_outscale_and_alpha_through_the_cli(ray_local, sr_model_uri, s3_bucket):
    address = ray_local.get_runtime_context().gcs_address
    rgba = _rgba(20, 24)
    storage.write_bytes(f"{s3_bucket}/in/rgba.png", encode_image(rgba, "png"))
    la = np.stack([rgba[..., 0], rgba[..., 3]], -1)  # grey + alpha
    storage.write_bytes(f"{s3_bucket}/in/grey.png", encode_image(la, "png"))
    photo = np.random.default_rng(0).integers(0, 256, (16, 20, 3), np.uint8)
    storage.write_bytes(f"{s3_bucket}/in/photo.jpg", encode_image(photo, "jpeg"))

    def run(out: str, *flags: str):
        r = genray("process", "superres", "-i", f"{s3_bucket}/in", "-o", f"{s3_bucket}/{out}", "--model",
                   sr_model_uri, "--address", address, *flags)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = {row["input_key"]: row for row in read_manifest_table(f"{s3_bucket}/{out}").to_pylist()}
        assert {row["status"] for row in rows.values()} == {"ok"}
        return {key: storage.read_bytes(f"{s3_bucket}/{out}/{row['output_key']}") for key, row in rows.items()}, rows

    # [1] WebP at x2 (the x4 model, then Lanczos): keys end .webp, alpha kept and resized, provenance in XMP.
    outputs, rows = run("webp", "--ext", "webp", "--quality", "95", "--outscale", "2")
    assert {row["output_key"] for row in rows.values()} == {"rgba.webp", "grey.webp", "photo.webp"}
    webp = Image.open(io.BytesIO(outputs["rgba.png"]))
    assert webp.format == "WEBP" and webp.size == (48, 40) and webp.mode == "RGBA"
    alpha = np.asarray(webp)[..., 3].astype(int)
    assert np.abs(alpha - _lanczos(rgba[..., 3], 48, 40)).max() <= 2  # near-lossless at quality 95
    assert alpha[:, 0].max() <= 5 and alpha[:, -1].min() >= 250  # transparent on the left, opaque on the right
    assert Image.open(io.BytesIO(outputs["grey.png"])).mode == "RGBA"  # WebP stores grey + alpha as RGBA
    assert decode_image(outputs["photo.jpg"]).shape == (32, 40, 3)
    assert read_metadata(outputs["photo.jpg"])["genray:model"] == sr_model_uri

    # [2] PNG at the model's own x4: grey + alpha stays LA (the Predictor answers grey with grey), with the exact
    # Lanczos alpha (lossless).
    outputs, _ = run("png")
    grey = Image.open(io.BytesIO(outputs["grey.png"]))
    assert grey.mode == "LA" and grey.size == (96, 80)
    assert np.array_equal(np.asarray(grey)[..., 1], _lanczos(rgba[..., 3], 96, 80))

    # [3] JPEG (no alpha channel) and --alpha composite: over white before the model, three channels out.
    for out, flags in (("jpg", ("--ext", "jpg", "--quality", "80")), ("composite", ("--alpha", "composite"))):
        outputs, rows = run(out, *flags)
        image = Image.open(io.BytesIO(outputs["rgba.png"]))
        assert image.mode == "RGB" and image.size == (96, 80)
        assert image.format == ("JPEG" if out == "jpg" else "PNG")
        assert rows["rgba.png"]["output_key"] == ("rgba.jpg" if out == "jpg" else "rgba.png")


def test_bad_output_options_are_refused_before_any_work(s3_server, tmp_path):
    for flags, what in ((("--ext", "gif"), "invalid choice: 'gif'"), (("--quality", "0"), "quality"),
                        (("--outscale", "-1"), "outscale")):
        r = genray("process", "superres", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--model", "m", *flags)
        assert r.returncode == 2 and what in r.stderr, r.stderr


@pytest.mark.integration
def test_preview_writes_a_contact_sheet_and_nothing_under_the_output(sr_model_uri, s3_bucket, tmp_path):
    """--preview N: the first N inputs (a loose file and an archive's members) through the model and the job's
    output settings, here, without Ray: one before/after sheet, one row per input; the output prefix stays empty."""
    import tarfile

    rng = np.random.default_rng(1)
    storage.write_bytes(f"{s3_bucket}/in/a.png", encode_image(_rgba(20, 24), "png"))
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        for i in range(3):
            data = encode_image(rng.integers(0, 256, (12, 16, 3), np.uint8), "png")
            info = tarfile.TarInfo(f"m/{i}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    storage.write_bytes(f"{s3_bucket}/in/b.tar", tar.getvalue())
    sheet = tmp_path / "sheet.png"
    r = genray("process", "superres", "-i", f"{s3_bucket}/in", "-o", f"{s3_bucket}/out", "--model", sr_model_uri,
               "--outscale", "2", "--preview", "3", "--preview-to", str(sheet), drop=("RAY_ADDRESS",))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "a.png 24x20 -> 48x40" in r.stdout and "b.tar#m/1.png 16x12 -> 32x24" in r.stdout
    assert "b.tar#m/2.png" not in r.stdout
    grid = decode_image(sheet.read_bytes())
    cell = 256 + 4
    assert grid.shape == (3 * cell + 4, 2 * cell + 4, 3)  # three rows: before | after
    assert storage.list_objects(f"{s3_bucket}/out") == []
    r = genray("process", "superres", "-i", f"{s3_bucket}/in", "-o", f"{s3_bucket}/out", "--model",
               f"{s3_bucket}/nope", "--preview", "2", "--preview-to", str(sheet))
    assert r.returncode == 2 and "genray: error:" in r.stderr and "Traceback" not in r.stderr
