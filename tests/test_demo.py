"""`genray demo` as a new user runs it: its own S3 server, its own Ray, train -> bulk -> serve -> HTTP."""
from __future__ import annotations

import json
import os
import subprocess

import pyarrow.dataset as pds
import pytest

from genray.images import decode_image
from helpers import GENRAY

pytestmark = pytest.mark.integration  # drives the genray CLI or jobs as subprocesses


def test_demo_runs_the_whole_flow(tmp_path):
    # A clean environment: no S3 endpoint or Ray address from the test session leaks into the demo.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["GENRAY_LOG_DIR"] = str(tmp_path / "logs")
    r = subprocess.run([GENRAY, "demo", "--epochs", "2", "--workdir", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    # Quiet by default on a non-TTY (issue 18): genray's own lines, Ray's logs in a file named once, at the end.
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert not [line for line in lines if any(noise in line for noise in (
        " INFO ", "(pid=", "pid=", "Reporting training result", "PlacementGroupCleaner", "Deprecat", "raylet", "core_worker", ".cc:"))], \
        "\n".join(lines)
    assert "[genray] epoch 1/2 " in out and "[genray] epoch 2/2 " in out and "eta " in out  # progress stays
    ray_log = out.strip().splitlines()[-1].split()[-1]
    assert ray_log.startswith(str(tmp_path / "logs"))
    assert out.strip().splitlines()[-1].strip().startswith("Ray logs") and out.count(ray_log) == 2
    logged = open(ray_log, encoding="utf-8").read()
    assert "Reporting training result" in logged and "Execution plan of Dataset" in logged
    assert "constructor arguments in the object store" in logged  # the driver's C++ line, off the terminal
    assert "local Ray, node IP 127.0.0.1" in out  # Ray's listeners stay on loopback
    assert "held-out PSNR" in out and "rerun of the same command: 24 skipped, 0 processed again" in out
    assert "-> 200 image/png 28x28" in out and "a non-image body -> 400" in out
    demo = tmp_path / "demo"
    meta = json.loads((demo / "run/model/model.json").read_text())
    assert meta["family"] == "denoise_ae" and meta["metrics"]["epoch"] == 2
    assert (demo / "run/samples/progress.gif").stat().st_size > 0 and (demo / "run/loss.png").exists()
    assert (demo / "served.png").read_bytes().startswith(b"\x89PNG")
    strip = decode_image((demo / "before_after.png").read_bytes())  # noisy / denoised / clean, 12 digits each
    assert strip.shape[0] > 3 * 28 * 4 and strip.shape[1] > 12 * 28 * 4
    rows = pds.dataset(str(demo / "denoised/_manifest"), format="parquet").to_table().to_pylist()
    assert len(rows) == 25 and sum(r["status"] == "error" for r in rows) == 1  # the corrupt file
    assert len(list((demo / "denoised").rglob("*.png"))) == 24
    assert "-> 360 images in 3 output shards" in out  # the held-out digits as WebDataset shards, tar shards out
    assert sorted(p.name for p in (demo / "denoised-shards").glob("*.tar")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
