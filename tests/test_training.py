"""Real Ray Train runs: 2 CPU workers, data and checkpoints in the real S3 server."""
from __future__ import annotations


import numpy as np
import pytest

from genray import storage
from genray.model_artifact import read_meta
from genray.images import decode_image
from genray.training.trainer import run_training

from helpers import read_history, tiny_train_config


def test_two_worker_run_writes_checkpoints_outputs_and_artefact(tiny_model):
    cfg, result = tiny_model
    out = cfg.output_uri
    keys = {o.key for o in storage.list_objects(out)}
    # Checkpoints in S3 (Ray Train's storage), per-epoch samples, the GIF, metrics, the loss plot, the artefact.
    assert any(k.startswith(f"checkpoints/{cfg.name}/checkpoint_") and k.endswith("/state.pt") for k in keys)
    assert {f"samples/epoch_{e:03d}.png" for e in range(1, 5)} <= keys
    assert {"samples/progress.gif", "metrics.jsonl", "loss.png", "model/weights.pt", "model/model.json"} <= keys
    history = read_history(out)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]  # it learns
    assert {row["lr_factor"] for row in history} == {1.0}  # the default schedule is constant
    # The sample grid is 3 rows (noisy / denoised / clean) of num_samples digits.
    grid = decode_image(storage.read_bytes(f"{out}/samples/epoch_004.png"), channels=None)
    assert grid.shape[0] > 3 * 28 and grid.shape[1] > cfg.train.num_samples * 28
    meta = read_meta(result.model_uri)
    assert meta["family"] == "denoise_ae" and meta["task"] == "denoise" and meta["digest"].startswith("sha256:")
    assert meta["num_workers"] == 2
    assert np.isfinite(meta["metrics"]["psnr_denoised_db"]) and np.isfinite(meta["metrics"]["psnr_noisy_db"])
    assert meta["metrics"]["num_eval_images"] == 32
    # The held-out figures are in metrics.jsonl too, on the last epoch's row (the 2-d autoencoder's k-NN
    # accuracies go there the same way).
    assert history[-1]["held_out_psnr_denoised_db"] == meta["metrics"]["psnr_denoised_db"]
    assert not any(k.startswith("held_out_") for row in history[:-1] for k in row)


def test_rerun_with_same_name_resumes_from_checkpoint(ray_local, digits_uri, s3_bucket):
    out = f"{s3_bucket}/resume"
    first = run_training(tiny_train_config(digits_uri, out, name="resume", epochs=2))
    first_digest = read_meta(first.model_uri)["digest"]
    assert [r["epoch"] for r in read_history(out)] == [1, 2]
    # Same name + same output, more epochs: continues at epoch 3 with the optimizer step count carried over.
    second = run_training(tiny_train_config(digits_uri, out, name="resume", epochs=3))
    history = read_history(out)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    steps_per_epoch = history[0]["step"]
    assert history[2]["step"] == 3 * steps_per_epoch
    assert history[1] == read_history(out)[1]  # epochs 1-2 were not recomputed
    assert read_meta(second.model_uri)["digest"] != first_digest  # the artefact now holds epoch-3 weights


def test_training_on_a_missing_prefix_fails_with_a_clear_error(ray_local, s3_bucket):
    from genray.training.trainer import TrainingError

    cfg = tiny_train_config(f"{s3_bucket}/nothing-here", f"{s3_bucket}/out", name="missing", epochs=1)
    with pytest.raises(TrainingError, match="nothing-here"):
        run_training(cfg)


def test_cosine_lr_factor_runs_from_one_to_the_floor():
    from genray.config import TrainParams
    from genray.training.loop import lr_factor

    cosine = TrainParams(epochs=5, lr_schedule="cosine", lr_min_factor=0.1)
    factors = [lr_factor(cosine, epoch) for epoch in range(1, 6)]
    # Epoch e trains at progress (e - 1) / epochs along the half cosine: 1.0 first, never quite the floor.
    expected = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)) for p in (0, 0.2, 0.4, 0.6, 0.8)]
    assert factors == pytest.approx(expected) and factors[0] == 1.0 and 0.1 < factors[-1] < 0.2
    assert {lr_factor(TrainParams(epochs=5), epoch) for epoch in range(1, 6)} == {1.0}
    assert lr_factor(TrainParams(epochs=1, lr_schedule="cosine"), 1) == 1.0
