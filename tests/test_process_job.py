"""Real Ray Data bulk jobs against the real S3 server."""
from __future__ import annotations

import numpy as np
import pytest

from genray import storage
from genray.process.job import JobError, run_process_job
from genray.config import ProcessConfig
from genray.datasets import read_image_prefix
from genray.images import decode_image, encode_png

from helpers import read_manifest_table

BAD_FILES = {
    "bad/zero.png": b"",
    "bad/not-an-image.jpg": b"this is text, not a JPEG",
    "bad/truncated.png": None,  # filled in below from a real PNG
}


@pytest.fixture
def noisy_inputs(s3_bucket, digits_uri):
    """6 noisy digits (one in a sub-folder, one RGB JPEG) plus 3 bad files under <bucket>/in/."""
    images, keys = read_image_prefix(f"{digits_uri}/test/", limit=5)
    rng = np.random.default_rng(0)
    inputs = f"{s3_bucket}/in"
    for i, image in enumerate(images):
        noisy = np.clip(image + rng.normal(0, 60, image.shape), 0, 255).astype(np.uint8)
        storage.write_bytes(f"{inputs}/{'sub/' if i == 0 else ''}digit{i}.png", encode_png(noisy))
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)).save(buf, format="JPEG")
    storage.write_bytes(f"{inputs}/photo.jpg", buf.getvalue())
    good = encode_png(images[0])
    bad = dict(BAD_FILES, **{"bad/truncated.png": good[: len(good) // 2]})
    for key, data in bad.items():
        storage.write_bytes(f"{inputs}/{key}", data)
    storage.write_bytes(f"{inputs}/notes.txt", b"not an image suffix: ignored")
    return inputs


def test_denoise_job_outputs_manifest_errors_and_rerun_skips(ray_local, tiny_model, noisy_inputs, s3_bucket):
    _, trained = tiny_model
    out = f"{s3_bucket}/out"
    cfg = ProcessConfig(task="denoise", input_uri=noisy_inputs, output_uri=out, model_uri=trained.model_uri,
                        batch_size=4)
    summary = run_process_job(cfg)
    assert summary.counts == {"ok": 6, "error": 3, "skipped": 0}

    # Outputs: same relative keys as PNG, same size and channels as the input.
    assert decode_image(storage.read_bytes(f"{out}/sub/digit0.png"), channels=None).shape == (28, 28, 1)
    assert decode_image(storage.read_bytes(f"{out}/photo.png"), channels=None).shape == (30, 41, 3)
    table = read_manifest_table(out)
    assert table.column_names == ["input_key", "output_key", "status", "error", "input_etag", "model_digest",
                                  "width", "height", "seconds", "node_id"]
    rows = {r["input_key"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 9  # one row per input
    assert rows["sub/digit0.png"]["output_key"] == "sub/digit0.png"
    assert rows["photo.jpg"]["status"] == "ok" and rows["photo.jpg"]["output_key"] == "photo.png"
    assert (rows["photo.jpg"]["width"], rows["photo.jpg"]["height"]) == (41, 30)
    assert rows["bad/zero.png"]["error"] == "empty file"
    assert "not an image" in rows["bad/not-an-image.jpg"]["error"]
    assert "truncated" in rows["bad/truncated.png"]["error"]
    assert all(r["model_digest"] == summary_digest(trained) for r in rows.values())
    assert not storage.exists(f"{out}/bad/zero.png")

    # Rerun: no work, every finished input is `skipped`; errors are retried (and fail again).
    again = run_process_job(cfg)
    assert again.counts == {"ok": 0, "skipped": 6, "error": 3}
    rows2 = {r["input_key"]: r for r in read_manifest_table(out).to_pylist()}
    # A skipped input keeps the row of the run that made its output (a rerun writes rows only for what it did).
    assert len(rows2) == 9 and {r["status"] for k, r in rows2.items() if not k.startswith("bad/")} == {"ok"}

    # A changed input (new ETag) is processed again; the rest stays skipped.
    storage.write_bytes(f"{noisy_inputs}/digit1.png", encode_png(np.zeros((28, 28, 1), np.uint8)))
    third = run_process_job(cfg)
    assert third.counts["ok"] == 1 and third.counts["skipped"] == 5


def summary_digest(trained) -> str:
    from genray.model_artifact import read_meta

    return read_meta(trained.model_uri)["digest"]


def test_dry_run_lists_without_writing(ray_local, tiny_model, noisy_inputs, s3_bucket):
    _, trained = tiny_model
    lines = []
    cfg = ProcessConfig(task="denoise", input_uri=noisy_inputs, output_uri=f"{s3_bucket}/dry",
                        model_uri=trained.model_uri, dry_run=True)
    run_process_job(cfg, log=lines.append)
    assert sum("would process" in line for line in lines) == 9
    assert storage.list_objects(f"{s3_bucket}/dry") == []


def test_wrong_task_and_missing_model_are_clear_errors(tiny_model, s3_bucket):
    _, trained = tiny_model
    with pytest.raises(JobError, match="not 'superres'"):
        run_process_job(ProcessConfig(task="superres", input_uri=s3_bucket, output_uri=f"{s3_bucket}/o",
                                      model_uri=trained.model_uri))
    with pytest.raises(JobError, match="not a genray model artefact"):
        run_process_job(ProcessConfig(task="denoise", input_uri=s3_bucket, output_uri=f"{s3_bucket}/o",
                                      model_uri=f"{s3_bucket}/no-model"))


def test_missing_input_bucket_is_a_clear_error(tiny_model, s3_server):
    _, trained = tiny_model
    with pytest.raises(JobError, match="does not exist"):
        run_process_job(ProcessConfig(task="denoise", input_uri="s3://no-such-bucket-xyz/in",
                                      output_uri="s3://no-such-bucket-xyz/out", model_uri=trained.model_uri))


def test_key_escaping_the_output_prefix_is_refused(ray_local, tiny_model, s3_bucket):
    _, trained = tiny_model
    bucket = s3_bucket.removeprefix("s3://")
    png = encode_png(np.zeros((28, 28, 1), np.uint8))
    storage.write_bytes(f"{s3_bucket}/in/fine.png", png)
    # S3 keys are free-form: this one would write to <bucket>/escape.png, outside the output prefix.
    storage.s3_client().put_object(Bucket=bucket, Key="in/../../escape.png", Body=png)
    summary = run_process_job(ProcessConfig(task="denoise", input_uri=f"{s3_bucket}/in",
                                            output_uri=f"{s3_bucket}/out/x", model_uri=trained.model_uri))
    assert summary.counts == {"ok": 1, "skipped": 0, "error": 1}
    rows = {r["input_key"]: r for r in read_manifest_table(f"{s3_bucket}/out/x").to_pylist()}
    assert rows["../../escape.png"]["status"] == "error" and ".." in rows["../../escape.png"]["error"]
    assert {o.key for o in storage.list_objects(s3_bucket)} == {
        "in/fine.png", "in/../../escape.png", "out/x/fine.png"} | {
        o.key for o in storage.list_objects(s3_bucket) if o.key.startswith("out/x/_manifest/")}


def test_missing_output_bucket_fails_before_any_work(ray_local, tiny_model, s3_bucket):
    _, trained = tiny_model
    storage.write_bytes(f"{s3_bucket}/in/a.png", encode_png(np.zeros((28, 28, 1), np.uint8)))
    with pytest.raises(JobError, match="no-such-out-bucket.*does not exist"):
        run_process_job(ProcessConfig(task="denoise", input_uri=f"{s3_bucket}/in",
                                      output_uri="s3://no-such-out-bucket/x", model_uri=trained.model_uri))
