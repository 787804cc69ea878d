"""Every job type as a real Ray Data job over the real S3 server: superres (with tiling), fast style, Gatys style;
a changed model redoes everything; faults (a model worker killed mid-job, S3 stalling mid-job) lose and
duplicate nothing."""
from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np
import pytest
import ray

from genray import storage
from genray.model_artifact import read_meta
from genray.process.gatys import GatysStylizer, gatys_digest
from genray.process.job import JobError, ProcessImages, run_process_job
from genray.config import ProcessConfig
from genray.images import decode_image, encode_png
from genray.models.style_net import builtin_style

from helpers import read_manifest_table, save_untrained_artifact

# The fault-injecting actor classes below live in this test module, which Ray's workers cannot import:
# ship the module to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _photo(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus texture: structure that makes tile seams visible if stitching were wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    planes = [np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * y * rng.uniform(0.5, 2))
              for _ in range(channels)]
    image = 127.5 + 100 * np.stack(planes, axis=2) + rng.normal(0, 12, (height, width, channels))
    return np.clip(image, 0, 255).astype(np.uint8)


def _upload(prefix: str, images: dict[str, np.ndarray]) -> None:
    for key, image in images.items():
        storage.write_bytes(f"{prefix}/{key}", encode_png(image))


def _outputs(out: str, keys) -> dict[str, np.ndarray]:
    return {k: decode_image(storage.read_bytes(f"{out}/{k}"), channels=None) for k in keys}


def test_superres_job_is_x4_and_tiling_matches_untiled(ray_local, sr_model_uri, s3_bucket):
    images = {"a.png": _photo(40, 56, seed=1), "sub/b.png": _photo(70, 90, seed=2),
              "grey.png": _photo(33, 47, channels=1, seed=3)}
    _upload(f"{s3_bucket}/in", images)
    whole = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/whole",
                          model_uri=sr_model_uri, tile=512)
    tiled = whole.model_copy(update={"output_uri": f"{s3_bucket}/tiled", "tile": 40, "tile_overlap": 16,
                                    "forward_batch_size": 1})  # one tile per forward pass
    assert run_process_job(whole).counts == {"ok": 3, "skipped": 0, "error": 0}
    assert run_process_job(tiled).counts == {"ok": 3, "skipped": 0, "error": 0}

    got_whole, got_tiled = _outputs(whole.output_uri, images), _outputs(tiled.output_uri, images)
    for key, image in images.items():
        h, w, c = image.shape
        assert got_whole[key].shape == got_tiled[key].shape == (4 * h, 4 * w, c)
        assert got_whole[key].std() > 2  # a structured (if untrained) output, so the comparison means something
        # 90x70 at tile 40 is 3x3 tiles, stitched with feathered seams: the same pixels to within a grey level.
        assert np.abs(got_tiled[key].astype(int) - got_whole[key]).max() <= 1, key
    rows = {r["input_key"]: r for r in read_manifest_table(tiled.output_uri).to_pylist()}
    assert (rows["sub/b.png"]["width"], rows["sub/b.png"]["height"]) == (90, 70)  # the input's size


def test_photo_denoiser_job_takes_any_size_through_tiles(ray_local, s3_bucket):
    model = save_untrained_artifact(f"{s3_bucket}/denoiser", "photo_denoiser")
    images = {"wide.png": _photo(50, 130, seed=9), "grey.png": _photo(61, 47, channels=1, seed=10)}
    _upload(f"{s3_bucket}/in", images)
    cfg = ProcessConfig(task="denoise", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                        model_uri=model, tile=40, tile_overlap=8)
    assert run_process_job(cfg).counts == {"ok": 2, "skipped": 0, "error": 0}
    for key, out in _outputs(cfg.output_uri, images).items():
        assert out.shape == images[key].shape


def test_rerun_skips_and_a_changed_model_redoes_everything(ray_local, s3_bucket):
    model = save_untrained_artifact(f"{s3_bucket}/model", "srgan", seed=0)
    _upload(f"{s3_bucket}/in", {f"img{i}.png": _photo(16, 20, seed=i) for i in range(4)})
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                        model_uri=model, batch_size=2)
    assert run_process_job(cfg).counts == {"ok": 4, "skipped": 0, "error": 0}
    before = storage.read_bytes(f"{s3_bucket}/out/img0.png")
    assert run_process_job(cfg).counts == {"ok": 0, "skipped": 4, "error": 0}

    save_untrained_artifact(model, "srgan", seed=1)  # same URI, new weights: a new digest
    assert run_process_job(cfg).counts == {"ok": 4, "skipped": 0, "error": 0}
    rows = read_manifest_table(cfg.output_uri).to_pylist()
    assert len(rows) == 4 and {r["model_digest"] for r in rows} == {read_meta(model)["digest"]}
    assert storage.read_bytes(f"{s3_bucket}/out/img0.png") != before


def test_style_job_with_a_fast_style_network(ray_local, style_model_uri, s3_bucket):
    images = {"p.png": _photo(30, 41, seed=4), "q.png": _photo(64, 64, channels=1, seed=5)}
    _upload(f"{s3_bucket}/in", images)
    cfg = ProcessConfig(task="style", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                        model_uri=style_model_uri)
    assert run_process_job(cfg).counts == {"ok": 2, "skipped": 0, "error": 0}
    for key, out in _outputs(cfg.output_uri, images).items():
        assert out.shape == images[key].shape


def _gatys_config(s3_bucket: str, **update) -> ProcessConfig:
    return ProcessConfig(task="style", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                         style_image_uri=f"{s3_bucket}/style.png", gatys_iterations=3, batch_size=1,
                         allow_untrained_vgg=True, vgg_download=False).model_copy(update=update)


@pytest.mark.filterwarnings("ignore:USING UNTRAINED VGG19")
def test_gatys_style_job_without_a_model(ray_local, s3_bucket):
    storage.write_bytes(f"{s3_bucket}/style.png", encode_png(builtin_style("stripes", 48)))
    images = {"c1.png": _photo(24, 32, seed=6), "c2.png": _photo(40, 28, channels=1, seed=7)}
    _upload(f"{s3_bucket}/in", images)
    cfg = _gatys_config(s3_bucket)
    assert run_process_job(cfg).counts == {"ok": 2, "skipped": 0, "error": 0}
    for key, out in _outputs(cfg.output_uri, images).items():
        assert out.shape == images[key].shape and not np.array_equal(out, images[key])
    digest = gatys_digest(storage.read_bytes(cfg.style_image_uri), "untrained", cfg)
    assert {r["model_digest"] for r in read_manifest_table(cfg.output_uri).to_pylist()} == {digest}

    assert run_process_job(cfg).counts["skipped"] == 2  # same style image and settings: done
    assert run_process_job(_gatys_config(s3_bucket, gatys_iterations=4)).counts["ok"] == 2  # new recipe


@pytest.mark.filterwarnings("ignore:USING UNTRAINED VGG19")
def test_gatys_reports_progress_per_image_and_shrinks_large_images(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/style.png", encode_png(builtin_style("waves", 32)))
    lines: list[str] = []
    stylizer = GatysStylizer(_gatys_config(s3_bucket, gatys_iterations=4, gatys_max_side=32), log=lines.append)
    (out,) = stylizer([_photo(40, 60, seed=8)], names=["big.png"])
    assert out.shape == (40, 60, 3)  # optimised at 21x32, resized back
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(line.startswith("[genray] gatys big.png:") for line in lines)


def test_gatys_without_style_image_or_weights_fails_before_any_work(ray_local, s3_bucket):
    _upload(f"{s3_bucket}/in", {"c.png": _photo(24, 24)})
    with pytest.raises(JobError, match="style image .*style.png"):
        run_process_job(_gatys_config(s3_bucket))
    storage.write_bytes(f"{s3_bucket}/style.png", encode_png(builtin_style("stripes", 32)))
    with pytest.raises(JobError, match="VGG19 weights not found"):
        run_process_job(_gatys_config(s3_bucket, allow_untrained_vgg=False))
    assert [o.key for o in storage.list_objects(s3_bucket) if o.key.startswith("out/")] == []


class CrashOnce(ProcessImages):
    """Kills its own worker process (no cleanup, like an OOM kill) the first time a batch holds `victim`."""

    victim = "img05.png"
    marker = ""  # a file that records that the crash happened, so the retry goes through

    def __call__(self, batch):
        if self.victim in list(batch["input_key"]) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


def test_worker_killed_mid_job_loses_and_duplicates_nothing(ray_local, sr_model_uri, s3_bucket, tmp_path):
    keys = [f"img{i:02d}.png" for i in range(12)]
    _upload(f"{s3_bucket}/in", {k: _photo(12, 12, seed=i) for i, k in enumerate(keys)})
    CrashOnce.marker = str(tmp_path / "crashed")
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                        model_uri=sr_model_uri, batch_size=2, concurrency=2, cpus_per_actor=0.5)
    summary = run_process_job(cfg, udf=CrashOnce)
    assert os.path.exists(CrashOnce.marker)  # the worker really died mid-job
    assert summary.counts == {"ok": 12, "skipped": 0, "error": 0}
    rows = read_manifest_table(cfg.output_uri).to_pylist()
    assert sorted(r["input_key"] for r in rows) == keys  # every input exactly once
    outputs = [o.key for o in storage.list_objects(cfg.output_uri) if not o.key.startswith("_manifest/")]
    assert sorted(outputs) == keys


class StallS3Once(ProcessImages):
    """SIGSTOPs the S3 server for `seconds` when a batch holds `victim` (once): every request in flight and every
    new one hangs, as in a network outage, until the server is resumed by a timer."""

    victim, seconds, server_pid, marker = "img03.png", 3.0, 0, ""

    def __call__(self, batch):
        if self.victim in list(batch["input_key"]) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.killpg(self.server_pid, signal.SIGSTOP)
            threading.Timer(self.seconds, os.killpg, (self.server_pid, signal.SIGCONT)).start()
        return super().__call__(batch)


def test_s3_outage_mid_job_loses_and_duplicates_nothing(ray_local, sr_model_uri, s3_server, s3_bucket, tmp_path):
    keys = [f"img{i:02d}.png" for i in range(8)]
    _upload(f"{s3_bucket}/in", {k: _photo(12, 12, seed=i) for i, k in enumerate(keys)})
    StallS3Once.server_pid, StallS3Once.marker = s3_server.pid, str(tmp_path / "stalled")
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                        model_uri=sr_model_uri, batch_size=2)
    summary = run_process_job(cfg, udf=StallS3Once)
    assert os.path.exists(StallS3Once.marker)
    assert summary.counts == {"ok": 8, "skipped": 0, "error": 0}
    assert sorted(r["input_key"] for r in read_manifest_table(cfg.output_uri).to_pylist()) == keys
