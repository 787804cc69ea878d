"""Training data at scale: what streaming the training set through Ray Data costs and saves, measured in one run.

- rss_ratio_10x_data: peak RSS (VmHWM) of one Ray Train worker training the photo denoiser on 10x more 128x128
  photo crops (3,000 vs 300 PNG files) for the same epochs. Target <= 1.2: a worker's memory must not grow with
  the dataset (before streaming, every worker decoded the whole prefix into its own memory).
- stream_vs_memory: training images/s of genray's streaming path over an in-memory reference (the same data
  decoded up front into a torch DataLoader with a DistributedSampler, as the loop did before; the reference lives
  here only), same model, same workers. Target >= 0.95: streaming must not slow a compute-bound step.
- shards_vs_loose: the same training from WebDataset tar shards vs loose PNG files in the S3 server with
  --latency-ms (default 40) per request, the data streamed every epoch. Target >= 1.0.
Prints one JSON line. `--smoke-test` runs tiny sizes in well under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from genray import archives, storage  # noqa: E402
from genray.config import TrainConfig  # noqa: E402
from genray.images import encode_png  # noqa: E402
from genray.training.trainer import run_training  # noqa: E402

WORKER_MARKER = "RayTrainWorker"  # Ray names a Train worker's process after its actor class


def write_crops(prefix_uri: str, count: int, size: int = 128) -> None:
    """`count` size x size photo crops as loose PNG files <prefix>/img_NNNNN.png."""
    common.upload_pngs(prefix_uri, common.lr_crops(count, size))


def write_shards(prefix_uri: str, count: int, size: int = 128, shard_size: int = 100) -> int:
    """The same crops as write_crops, as WebDataset shards <prefix>/shard-NNNNNN.tar; returns the shard count."""
    writer = archives.ShardWriter(prefix_uri, shard_size, start_index=0)
    for i, image in enumerate(common.lr_crops(count, size)):
        writer.add([(f"img_{i:05d}.png", encode_png(image))])
    writer.close()
    return len(writer.written)


def train_config(data_uri: str, out_uri: str, name: str, epochs: int, model: dict, workers: int = 2,
                 batch_size: int = 32, data: dict | None = None) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": name, "output_uri": f"{out_uri}/{name}", "model": model,
        "data": {"uri": data_uri, **(data or {})},
        "train": {"epochs": epochs, "batch_size": batch_size, "checkpoint_every": epochs, "num_samples": 4},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
    })


def steady_images_per_s(history: list[dict]) -> float:
    """Median images/s over the epochs after the first (the first includes start-up and the first reads)."""
    rates = [r["images_per_s"] for r in history[1:]] or [history[0]["images_per_s"]]
    return statistics.median(rates)


def read_history(output_uri: str) -> list[dict]:
    text = storage.read_bytes(storage.join_uri(output_uri, "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def train_and_measure(cfg: TrainConfig) -> dict:
    """Run genray's training; peak RSS of the largest Train worker and the steady images/s."""
    with common.TreeMemory(marker=WORKER_MARKER, interval=0.05) as memory:
        started = time.perf_counter()
        run_training(cfg)
        seconds = time.perf_counter() - started
    history = read_history(cfg.output_uri)
    return {"worker_peak_rss_mb": round(memory.peak_marked_kb / 1024, 1), "seconds": round(seconds, 2),
            "images_per_s": steady_images_per_s(history), "num_workers_seen": memory.num_marked}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, for CI (well under a minute)")
    p.add_argument("--images", type=int, default=300, help="crops in the small dataset (the large one has 10x)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=40.0, help="added to every S3 request (shards_vs_loose)")
    p.add_argument("--only", choices=("rss", "stream", "shards"), action="append",
                   help="run only these parts (repeatable); default: all")
    args = p.parse_args(argv)
    small = 20 if args.smoke_test else args.images
    epochs = 2 if args.smoke_test else args.epochs
    parts = set(args.only or ("rss", "stream", "shards"))
    # A small DnCNN on 64x64 patches: compute-bound like real training, cheap enough for 2 CPU cores.
    denoiser = {"family": "photo_denoiser", "depth": 5, "width": 16, "patch": 64, "crops_per_image": 1}
    result: dict = {"images_small": small, "images_large": 10 * small, "epochs": epochs}

    with common.local_s3(latency_ms=0) as s3, common.local_ray(), tempfile.TemporaryDirectory() as tmp:
        out = f"{common.BUCKET}/runs"
        if "rss" in parts:
            # [1] Worker memory: 1x vs 10x the data, local files (memory does not depend on where files are).
            figures = {}
            for label, count in (("1x", small), ("10x", 10 * small)):
                write_crops(f"{tmp}/crops_{label}", count)
                cfg = train_config(f"{tmp}/crops_{label}", tmp, f"rss_{label}", epochs, denoiser)
                figures[label] = train_and_measure(cfg)
                common.log(f"[rss] {label}: {figures[label]}")
            result["worker_peak_rss_mb"] = {k: v["worker_peak_rss_mb"] for k, v in figures.items()}
            result["rss_ratio_10x_data"] = round(figures["10x"]["worker_peak_rss_mb"]
                                                 / max(figures["1x"]["worker_peak_rss_mb"], 1e-9), 3)
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
