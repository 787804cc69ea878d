"""What experiment tracking costs rank 0 per epoch, beside the outputs it already writes, measured in one run.

Per epoch, rank 0 already writes the sample grid PNG, metrics.jsonl and loss.png (genray/training/outputs.py);
tracking adds TensorBoard (scalars + the grid image, the event file copied to <output>/tensorboard/) and, with
tracking.mlflow_uri, an MLflow log_batch. Both are timed over the same epochs, on a local output and on an s3://
output (the local S3 server), with the denoise_ae sample grid's size (3 rows of 8 digits). Also timed once: the
imports and opening the tracker (paid once per training attempt on rank 0).
Prints one JSON line: {"local": {...}, "s3": {...}, "startup_s": ...}; *_ms figures are per epoch (median).
"""
from __future__ import annotations

import importlib
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch  # imported before the timed startup: a Train worker has it already

from genray.config import TrackingConfig, TrainConfig
from genray.datasets import load_embedded
from genray.images import make_grid
from genray.training import outputs

from _common import BUCKET, local_s3, log

EPOCHS = 20


def config(output_uri: str, mlflow_uri: str | None) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "bench", "output_uri": output_uri, "model": {"family": "denoise_ae"},
        "data": {"uri": "unused/"}, "train": {"epochs": EPOCHS + 1},  # the tracker stays open for every epoch
        "tracking": TrackingConfig(mlflow_uri=mlflow_uri).model_dump(),
    })


def epoch_row(epoch: int) -> dict:
    return {"epoch": epoch, "step": epoch * 12, "loss": 1.0 / epoch, "lr_factor": 1.0, "epoch_seconds": 2.5,
            "images_per_s": 400.0, "world_size": 2, "data_errors": 0, "worker_peak_rss_mb": 700.0,
            "worker_pids": [1, 2], "worker_nodes": ["a", "b"]}


def per_epoch_ms(step) -> float:
    times = []
    for epoch in range(1, EPOCHS + 1):
        started = time.perf_counter()
        step(epoch)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def measure(output_uri: str, mlflow_dir: str, grid: np.ndarray) -> dict:
    from genray.training.tracking import EpochTracker

    history: list[dict] = []

    def write_outputs(epoch: int) -> None:  # what report() wrote per epoch before tracking
        history.append(epoch_row(epoch))
        outputs.write_sample_grid(output_uri, epoch, grid)
        outputs.write_metrics(output_uri, history)
        outputs.write_loss_plot(output_uri, history)

    tb_only = EpochTracker(config(output_uri + "/tb-only", None))
    both = EpochTracker(config(output_uri + "/both", f"file:{mlflow_dir}"))
    row = {"outputs_ms": per_epoch_ms(write_outputs),
           "tensorboard_ms": per_epoch_ms(lambda e: tb_only.log_epoch(e, epoch_row(e), grid)),
           "tensorboard_and_mlflow_ms": per_epoch_ms(lambda e: both.log_epoch(e, epoch_row(e), grid))}
    row["tracking_vs_outputs"] = round(row["tensorboard_and_mlflow_ms"] / row["outputs_ms"], 3)
    return row


def main() -> None:
    digits, _, _ = load_embedded("digits")
    grid = make_grid(list(digits[:24]), nrow=8)  # (3 rows x 8) like denoise_ae's noisy / denoised / clean grid
    torch.set_num_threads(1)  # as in a Train worker on one CPU
    started = time.perf_counter()
    for module in ("torch.utils.tensorboard", "mlflow.tracking"):  # part of what is timed: rank 0 pays them once
        importlib.import_module(module)
    from genray.training.tracking import EpochTracker
    with tempfile.TemporaryDirectory() as tmp:
        EpochTracker(config(f"{tmp}/startup", f"file:{tmp}/mlruns-startup"))
        startup = round(time.perf_counter() - started, 2)
        log(f"startup {startup}s; local ...")
        result = {"epochs": EPOCHS, "grid_shape": list(grid.shape), "startup_s": startup,
                  "local": measure(f"{tmp}/out", f"{tmp}/mlruns-local", grid)}
        with local_s3():
            log("s3 ...")
            result["s3"] = measure(f"{BUCKET}/tracking", f"{tmp}/mlruns-s3", grid)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
