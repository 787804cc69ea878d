"""Ray Train's cost over a plain PyTorch loop, and its scaling from 1 to 2 workers, measured in one run.

Same model, same data (an embedded dataset written to a local folder), same train_step, one intra-op thread per
worker. Step times come from the loop's own per-epoch timer (data loading + train steps, no checkpoint I/O) and
are the median over epochs after the first.

Two workloads, because they scale differently:
- `photo_denoiser` (the headline figures): a DnCNN on 48x48 photo patches, the network the bulk denoise job
  runs. Compute per step dwarfs the gradient all-reduce, as in real training.
- `denoise_ae` (reported under "digits_ae"): the seed-size 28x28 denoising autoencoder, ~8 ms of compute per
  step. Its 2-worker figure shows gloo's fixed all-reduce latency (~5 ms/step on this machine), not Ray.
Prints one JSON line: {"ray_vs_plain_step_time": ..., "scaling_2_workers": ..., "digits_ae": {...}}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from genray.config import TrainConfig  # noqa: E402
from genray.datasets import export_dataset, read_image_prefix  # noqa: E402
from genray.models import get_spec  # noqa: E402
from genray.models.data import build_dataset  # noqa: E402


# family -> (embedded dataset, model options): the benchmark's two workloads
WORKLOADS = {
    "photo_denoiser": ("photos", {"family": "photo_denoiser", "depth": 8, "width": 32, "patch": 48,
                                  "crops_per_image": 64}),
    "denoise_ae": ("digits", {"family": "denoise_ae"}),
}


def config(data_dir: str, out_dir: str, name: str, workers: int, epochs: int, batch_size: int,
           model: dict) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": name, "output_uri": f"{out_dir}/{name}",
        "model": model,
        "data": {"uri": f"{data_dir}/train/"},
        "train": {"epochs": epochs, "batch_size": batch_size, "checkpoint_every": epochs},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
    })


def plain_loop(cfg: TrainConfig) -> tuple[float, float]:
    """(median seconds per step, images/s) of the same loop without Ray: one process, one thread."""
    torch.set_num_threads(1)
    spec = get_spec(cfg.model.family)
    images, _ = read_image_prefix(cfg.data.uri, channels=spec.in_channels(cfg.model))
    dataset = build_dataset(spec, images, None, cfg.model)
    torch.manual_seed(cfg.train.seed)
    state = spec.init_training(cfg.model, cfg.train.lr)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    per_step, per_image = [], []
    for _ in range(cfg.train.epochs):
        started, steps, items = time.perf_counter(), 0, 0
        for batch in loader:
            spec.train_step(state, batch)
            steps, items = steps + 1, items + len(batch)
        seconds = time.perf_counter() - started
        per_step.append(seconds / steps)
        per_image.append(items / seconds)
    return statistics.median(per_step[1:]), statistics.median(per_image[1:])


def ray_run(cfg: TrainConfig) -> tuple[float, float]:
    """(median seconds per step on each worker, images/s over all workers) from the run's metrics.jsonl."""
    from genray.training.trainer import run_training

    run_training(cfg)
    with open(f"{cfg.output_uri}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f][1:]  # the first epoch includes warm-up
    steps_per_epoch = rows[0]["step"] // rows[0]["epoch"]  # the step count after epoch e is e * steps_per_epoch
    per_step = [r["epoch_seconds"] / steps_per_epoch for r in rows]
    return statistics.median(per_step), statistics.median(r["images_per_s"] for r in rows)


def measure(tmp: str, family: str, epochs: int, batch_size: int) -> dict:
    dataset, model = WORKLOADS[family]
    data_dir = f"{tmp}/{dataset}"
    export_dataset(dataset, data_dir, split="train")
    one = config(data_dir, tmp, f"{family}-one", 1, epochs, batch_size, model)
    plain_step, plain_ips = plain_loop(one)
    ray1_step, ray1_ips = ray_run(one)
    # Same per-worker batch: 2 workers process twice the images per step.
    ray2_step, ray2_ips = ray_run(config(data_dir, tmp, f"{family}-two", 2, epochs, batch_size, model))
    return {
        "ray_vs_plain_step_time": round(ray1_step / plain_step, 3),
        "scaling_2_workers": round(ray2_ips / ray1_ips, 3),
        "plain_ms_per_step": round(plain_step * 1000, 2),
        "ray_1_worker_ms_per_step": round(ray1_step * 1000, 2),
        "ray_2_workers_ms_per_step": round(ray2_step * 1000, 2),
        "plain_images_per_s": round(plain_ips, 1),
        "ray_1_worker_images_per_s": round(ray1_ips, 1),
        "ray_2_workers_images_per_s": round(ray2_ips, 1),
        "batch_size_per_worker": batch_size,
        "epochs": epochs,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="photo denoiser patches per worker and step")
    p.add_argument("--ae-batch-size", type=int, default=32, help="digits autoencoder images per worker and step")
    p.add_argument("--smoke-test", action="store_true", help="3 epochs, for CI")
    args = p.parse_args(argv)
    epochs = 3 if args.smoke_test else args.epochs

    import ray

    with tempfile.TemporaryDirectory(prefix="genray-bench-") as tmp:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        figures = {"model": "photo_denoiser", **measure(tmp, "photo_denoiser", epochs, args.batch_size)}
        figures["digits_ae"] = measure(tmp, "denoise_ae", max(epochs, 4), args.ae_batch_size)
        ray.shutdown()
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
