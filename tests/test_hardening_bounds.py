"""Issue 17, bounded memory per input: archives whose headers lie (PAX headers of hundreds of MB, zip members
declaring 1 kB and inflating to 200 MB with bzip2 and lzma, huge and many non-image parts), gzip trailers, member
counts, loose files past --max-input-bytes, outputs past --max-output-pixels, formats outside the allowlist and
16-bit/float decoding. The memory bounds run in a subprocess under an address-space limit (RLIMIT_AS), so a
regression fails with MemoryError instead of swapping; the same inputs then go through the real CLI against the S3
server and come back as error rows naming their limit while the job carries on."""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from genray import storage

from helpers import genray, image_bytes, random_png, read_manifest_table

BOMB = 200 << 20  # what each crafted part really holds
BUDGET = 128 << 20  # address space the reader may add to what it had after its imports


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _stream_member(out, name: str, size: int, fill: bytes = b"\0", kind: bytes = tarfile.REGTYPE) -> None:
    """A tar entry of `size` bytes written in 1 MB pieces (the test never holds it whole)."""
    out.write(_header(name, size, kind))
    left = size
    while left:
        n = min(left, 1 << 20)
        out.write(fill * n)
        left -= n
    out.write(b"\0" * (-size % 512))


def _member(out, name: str, data: bytes) -> None:
    out.write(_header(name, len(data)) + data + b"\0" * (-len(data) % 512))


def pax_bomb_tgz() -> bytes:
    """A .tar.gz whose first entry is a PAX header holding a 200 MB path (gzip makes it ~200 kB)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as gz:
        body = BOMB - 20
        record_len = len(f"{body} path=") + body + 1
        record_len = len(f"{record_len} path=") + body + 1
        gz.write(_header("././@PaxHeader", record_len, tarfile.XHDTYPE))
        gz.write(f"{record_len} path=".encode())
        for _ in range(body >> 20):
            gz.write(b"a" * (1 << 20))
        gz.write(b"a" * (body % (1 << 20)) + b"\n" + b"\0" * (-record_len % 512))
        _member(gz, "after.png", random_png(1))
        gz.write(b"\0" * 1024)
    return buffer.getvalue()


def parts_tgz() -> bytes:
    """One sample with a 200 MB non-image part, a 200 MB .json sidecar, and 400 half-MB .txt parts."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as gz:
        _member(gz, "s0.png", random_png(2))
        _stream_member(gz, "s0.bin", BOMB)
        _stream_member(gz, "s0.json", BOMB, b" ")
        for i in range(400):
            _stream_member(gz, f"s0.p{i:03d}.txt", BOMB // 400, b"x")
        _member(gz, "s1.png", random_png(3))
        gz.write(b"\0" * 1024)
    return buffer.getvalue()


def lying_zip() -> bytes:
    """A zip whose bzip2 and lzma members declare 1,000 bytes and hold 200 MB of zeros each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ok.png", random_png(4))
        for name, method in (("bz.png", zipfile.ZIP_BZIP2), ("xz.png", zipfile.ZIP_LZMA)):
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            with zf.open(info, "w") as f:  # streamed: zipfile compresses as it goes
                for _ in range(BOMB >> 20):
                    f.write(b"\0" * (1 << 20))
    data = bytearray(buffer.getvalue())
    # Rewrite the declared size of every member but ok.png in the central directory and the local headers.
    end = data.rindex(b"PK\x05\x06")
    entries, cd_offset = struct.unpack("<H", data[end + 10:end + 12])[0], struct.unpack("<I", data[end + 16:end + 20])[0]
    pos = cd_offset
    for _ in range(entries):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28:pos + 34])
        name = bytes(data[pos + 46:pos + 46 + name_len])
        local = struct.unpack("<I", data[pos + 42:pos + 46])[0]
        if name != b"ok.png":
            data[pos + 24:pos + 28] = struct.pack("<I", 1000)
            data[local + 22:local + 26] = struct.pack("<I", 1000)
        pos += 46 + name_len + extra_len + comment_len
    return bytes(data)


def bad_crc_tgz() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i in range(2):
            data = random_png(10 + i)
            info = tarfile.TarInfo(f"g{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = bytearray(buffer.getvalue())
    data[-8] ^= 0xFF  # the trailer's CRC32
    return bytes(data)


def many_members_tar(n: int) -> bytes:
    buffer = io.BytesIO()
    for i in range(n):
        _member(buffer, f"m{i:05d}.txt", b"x")
    buffer.write(b"\0" * 1024)
    return buffer.getvalue()


# --- read tasks under an address-space limit --------------------------------------------------------------------

_CHILD = """
import json, resource, sys
from genray import archives, storage
from genray.process import read_stage
storage.s3_client()
size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
limit = size + int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
unit = json.loads(sys.argv[1])
limits = archives.Limits(**json.loads(sys.argv[2]))
rows = []
for row in read_stage._archive_rows(unit, "digest", False, limits):
    got = json.loads(row["result"]) if row["result"] else {"input_key": row["input_key"], "status": "read",
                                                           "error": None}
    rows.append([got["input_key"], got["status"], got["error"], len(row["data"] or b"")])
print(json.dumps(rows))
"""


def _read_under_limit(uri: str, **limits) -> dict[str, tuple]:
    """The read stage over one archive in a subprocess whose address space may grow by BUDGET only."""
    info = storage.stat(uri)
    unit = {"kind": "archive", "key": uri.rsplit("/", 1)[-1], "uri": uri, "etag": info.etag, "size": info.size,
            "done": {}}
    limits = {"max_member_bytes": 8 * 64_000_000 + (1 << 20), **limits}  # the defaults of a job
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(unit), json.dumps(limits), str(BUDGET)],
                       capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stderr[-2000:]  # a MemoryError (or a crash) would end up here
    return {key: (status, error, size) for key, status, error, size in json.loads(r.stdout)}


@pytest.fixture(scope="module")
def crafted(s3_server):
    """The crafted archives and files in a bucket of the real S3 server (built once: they take seconds)."""
    bucket = "s3://genray-test-bounds"
    storage.ensure_bucket(bucket)
    inputs = f"{bucket}/in"
    storage.write_bytes(f"{inputs}/pax.tar.gz", pax_bomb_tgz())
    storage.write_bytes(f"{inputs}/parts.tgz", parts_tgz())
    storage.write_bytes(f"{inputs}/lie.zip", lying_zip())
    storage.write_bytes(f"{inputs}/crc.tar.gz", bad_crc_tgz())
    storage.write_bytes(f"{inputs}/many.tar", many_members_tar(3000))
    return bucket


def test_pax_header_bomb_is_refused_within_the_memory_bound(crafted):
    rows = _read_under_limit(f"{crafted}/in/pax.tar.gz")
    status, error, _ = rows["pax.tar.gz"]
    assert status == "error" and "extended tar header of" in error and "limit 1,048,576" in error


def test_zip_members_lying_about_their_size_are_error_rows_within_the_memory_bound(crafted):
    rows = _read_under_limit(f"{crafted}/in/lie.zip")
    assert rows["lie.zip#ok.png"][0] == "read"
    for name in ("bz.png", "xz.png"):
        status, error, _ = rows[f"lie.zip#{name}"]
        assert status == "error" and "more than the 1,000 bytes it declares" in error
    assert rows["lie.zip"][0] == "ok"  # the archive itself was read to its end


def test_huge_and_many_non_image_parts_are_never_held(crafted):
    rows = _read_under_limit(f"{crafted}/in/parts.tgz")
    assert rows["parts.tgz#s0.png"][0] == "read" and rows["parts.tgz#s1.png"][0] == "read"
    assert rows["parts.tgz"][0] == "ok"


def test_gzip_trailer_and_member_count_are_checked(crafted):
    rows = _read_under_limit(f"{crafted}/in/crc.tar.gz")
    assert rows["crc.tar.gz"][0] == "error" and "CRC check failed" in rows["crc.tar.gz"][1]
    rows = _read_under_limit(f"{crafted}/in/many.tar", max_members=1000)
    assert rows["many.tar"][0] == "error"
    assert "more than 1,000 entries (--max-archive-members)" in rows["many.tar"][1]


_DECODE_CHILD = """
import resource, sys
from genray.images import decode_image
data = open(sys.argv[1], 'rb').read()
size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
limit = size + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
image = decode_image(data, channels=None)
print(image.shape, image.dtype, int(image.max()))
"""


@pytest.mark.parametrize("kind", ["png16", "tiff_float"])
def test_16_bit_and_float_images_decode_within_a_bound_per_pixel(kind, tmp_path):
    """A 24 MP 16-bit PNG / 32-bit float TIFF in 12 bytes per pixel (Pillow's own copy, numpy's, uint8 out); the
    float64 conversion took ~40."""
    side = 4900  # 24 M pixels
    if kind == "png16":
        values = np.full((side, side), 65535, dtype=np.uint16)
        data = image_bytes(Image.fromarray(values), "PNG", compress_level=1)  # mode I;16
    else:
        values = np.ones((side, side), dtype=np.float32)
        data = image_bytes(Image.fromarray(values), "TIFF", compression="tiff_adobe_deflate")  # mode F
    path = tmp_path / "image"
    path.write_bytes(data)
    del values, data
    r = subprocess.run([sys.executable, "-c", _DECODE_CHILD, str(path), str(12 * side * side)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(4900,", "4900,", "1)", "uint8", "255"]


# --- the same through the real CLI ------------------------------------------------------------------------------

def test_every_bound_is_an_error_row_naming_its_limit_through_the_cli(ray_local, sr_model_uri, crafted):
    inputs, out = f"{crafted}/in", f"{crafted}/out"
    storage.write_bytes(f"{inputs}/small.png", random_png(20, 12))
    storage.write_bytes(f"{inputs}/wide.png", random_png(21, 40))  # x4 -> 160x160 = 25,600 output pixels
    storage.write_bytes(f"{inputs}/big.png", random_png(22, 200))  # ~120 kB, past --max-input-bytes
    # Outside the format allowlist though named .png: an ICO and a Targa file.
    storage.write_bytes(f"{inputs}/icon.png", image_bytes(Image.new("RGB", (16, 16), "red"), "ICO"))
    storage.write_bytes(f"{inputs}/targa.png", image_bytes(Image.new("RGB", (16, 16), "red"), "TGA"))
    r = genray("process", "superres", "--input", inputs, "--output", out, "--model", sr_model_uri,
               "--batch-size", "4", "--max-input-bytes", "100000", "--max-output-pixels", "20000",
               "--max-archive-members", "1000", "--address", ray_local.get_runtime_context().gcs_address,
               timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["input_key"]: row for row in read_manifest_table(out).to_pylist()}
    assert rows["small.png"]["status"] == "ok"
    expect = {
        "wide.png": "limit 20,000 (--max-output-pixels)",
        "big.png": "limit 100,000 (--max-input-bytes)",
        "icon.png": "not an image",
        "targa.png": "not an image",
        "pax.tar.gz": "extended tar header",
        "lie.zip#bz.png": "more than the 1,000 bytes it declares",
        "lie.zip#xz.png": "more than the 1,000 bytes it declares",
        "crc.tar.gz": "CRC check failed",
        "many.tar": "(--max-archive-members)",
    }
    for key, text in expect.items():
        assert rows[key]["status"] == "error" and text in rows[key]["error"], (key, rows[key])
    assert rows["lie.zip#ok.png"]["status"] == "ok"
    assert rows["parts.tgz#s0.png"]["status"] == "ok" and rows["parts.tgz#s1.png"]["status"] == "ok"
    # Only the allowlisted sidecar within its cap rides along: s0.json (200 MB) and s0.bin never; the .txt parts
    # up to the sample's part cap.
    written = {o.key for o in storage.list_objects(out)}
    assert "parts.tgz/s0.json" not in written and "parts.tgz/s0.bin" not in written
