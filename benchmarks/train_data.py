"""Training data at scale: what streaming the training set through Ray Data costs and saves, measured in one run.

- rss_ratio_10x_data: peak RSS (VmHWM) of one Ray Train worker training the photo denoiser on 10x more 128x128
  photo crops (3,000 vs 300 PNG files) for the same epochs. Target <= 1.2: a worker's memory must not grow with
  the dataset (before streaming, every worker decoded the whole prefix into its own memory).
- stream_vs_memory: training images/s of genray's data path (Ray Data + get_dataset_shard, default settings: this
  small set is decoded once into the object store) over an in-memory reference (the same data decoded up front
  into a torch DataLoader with a DistributedSampler, as the loop did before; the reference lives here only), same
  model, same workers, neither side under the /proc memory sampler; the medians of --rounds alternating runs of
  each. Target >= 0.95: streaming must not slow a compute-bound step. stream_every_epoch_vs_memory: the same with
  the files read and decoded again every epoch (data.materialize=never).
- shards_vs_loose: the same training from WebDataset tar shards vs loose PNG files in the S3 server with
  --latency-ms (default 40) per request, the data streamed every epoch. Target >= 1.0.
Prints one JSON line. `--smoke-test` runs tiny sizes in well under a minute.
"""
from __future__ import annotations

import argparse
import contextlib
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


def train_and_measure(cfg: TrainConfig, memory: bool = True) -> dict:
    """Run genray's training; the steady images/s and (memory=True) the peak RSS of the largest Train worker.

    The /proc sampler walks every process 20 times a second and takes about a third of a core on this 2-core
    machine: throughput compared with a run that has no sampler (the in-memory reference) is measured without it."""
    sampler = common.TreeMemory(marker=WORKER_MARKER, interval=0.05) if memory else contextlib.nullcontext()
    with sampler:
        started = time.perf_counter()
        run_training(cfg)
        seconds = time.perf_counter() - started
    history = read_history(cfg.output_uri)
    figures = {"seconds": round(seconds, 2), "images_per_s": steady_images_per_s(history),
               # the steps' wait for data per epoch (the slowest worker's), after the first epoch
               "data_wait_s": [r.get("data_wait_seconds") for r in history[1:]],
               "epoch_s": [r["epoch_seconds"] for r in history[1:]]}
    if memory:
        figures.update(worker_peak_rss_mb=round(sampler.peak_marked_kb / 1024, 1),
                       worker_peak_private_mb=round(sampler.peak_marked_anon_kb / 1024, 1),
                       num_workers_seen=sampler.num_marked)
    return figures


def reference_loop(config: dict) -> None:
    cfg = TrainConfig.model_validate(config["cfg"])
    rates = reference_rates(cfg)
    if ray_rank() == 0:  # Train V2 keeps metrics only with checkpoints: the rates go to a file
        with open(config["rates_file"], "w") as f:
            json.dump(rates, f)


def ray_rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def reference_rates(cfg: TrainConfig) -> list[float]:
    """The in-memory reference (the loop before streaming): every worker decodes the whole prefix up front into
    the family's dataset, a DistributedSampler shards it, a DataLoader batches it. Returns images/s per epoch."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from genray.datasets import read_image_prefix
    from genray.models import get_spec
    from genray.models.data import build_dataset

    spec = get_spec(cfg.model.family)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    images, _ = read_image_prefix(cfg.data.uri, channels=spec.in_channels(cfg.model))
    dataset = build_dataset(spec, images, None, cfg.model)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler)
    state = spec.init_training(cfg.model, cfg.train.lr)
    state.modules = {n: ray.train.torch.prepare_model(m) for n, m in state.modules.items()}
    rates = []
    for epoch in range(1, cfg.train.epochs + 1):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        started, items = time.perf_counter(), 0
        for batch in loader:
            spec.train_step(state, batch)
            items += len(batch)
        rates.append(items * world / (time.perf_counter() - started))
    return rates


def reference_images_per_s(cfg: TrainConfig, storage_dir: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rates_file = f"{storage_dir}.rates.json"
    trainer = TorchTrainer(
        reference_loop, train_loop_config={"cfg": cfg.model_dump_plain(), "rates_file": rates_file},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.name}_reference", storage_path=storage_dir,
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}))
    trainer.fit()
    with open(rates_file) as f:
        rates = json.load(f)
    return statistics.median(rates[1:] or rates)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, for CI (well under a minute)")
    p.add_argument("--images", type=int, default=300, help="crops in the small dataset (the large one has 10x)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating genray/reference rounds (stream_vs_memory)")
    p.add_argument("--latency-ms", type=float, default=40.0, help="added to every S3 request (shards_vs_loose)")
    p.add_argument("--only", choices=("rss", "stream", "shards"), action="append",
                   help="run only these parts (repeatable); default: all")
    args = p.parse_args(argv)
    small = 20 if args.smoke_test else args.images
    epochs = 1 if args.smoke_test else args.epochs
    rounds = 1 if args.smoke_test else args.rounds
    parts = set(args.only or ("rss", "stream", "shards"))
    # A small DnCNN on 64x64 patches: compute-bound like real training, cheap enough for 2 CPU cores.
    denoiser = {"family": "photo_denoiser", "depth": 5, "width": 16, "patch": 64, "crops_per_image": 1}
    result: dict = {"images_small": small, "images_large": 10 * small, "epochs": epochs}

    with common.local_s3(latency_ms=0) as s3, common.local_ray(), tempfile.TemporaryDirectory() as tmp:
        if "rss" in parts:
            # [1] Worker memory: 1x vs 10x the data, local files (memory does not depend on where files are).
            figures = {}
            for label, count in (("1x", small), ("10x", 10 * small)):
                write_crops(f"{tmp}/crops_{label}", count)
                cfg = train_config(f"{tmp}/crops_{label}", tmp, f"rss_{label}", epochs, denoiser,
                                   data={"materialize": "never"})  # both streamed from the files every epoch
                figures[label] = train_and_measure(cfg)
                common.log(f"[rss] {label}: {figures[label]}")
            result["worker_peak_rss_mb"] = {k: v["worker_peak_rss_mb"] for k, v in figures.items()}
            # RSS without shared pages (sampled every 50 ms): what the worker itself holds
            result["worker_peak_private_mb"] = {k: v["worker_peak_private_mb"] for k, v in figures.items()}
            result["rss_ratio_10x_data"] = round(figures["10x"]["worker_peak_rss_mb"]
                                                 / max(figures["1x"]["worker_peak_rss_mb"], 1e-9), 3)
        if "stream" in parts:
            # [2] The same data, model and workers: genray's path streaming every epoch (nothing materialised) vs
            # the in-memory reference. 4 crops per image and a deeper net: a compute-bound step.
            data_uri = f"{tmp}/crops_stream"
            write_crops(data_uri, small)
            model = {**denoiser, "depth": 8, "width": 24, "crops_per_image": 4}
            # Rounds alternate genray and the reference: on a shared VM the same steps drift by 10-15 % over
            # minutes, which sequential runs would read as a difference between the two.
            streamed, reference = [], []
            for r in range(rounds):
                cfg = train_config(data_uri, tmp, f"stream{r}", epochs + 1, model)  # default: small data materialised
                figures = train_and_measure(cfg, memory=False)
                common.log(f"[stream] round {r + 1}: genray {figures}")
                streamed.append(figures["images_per_s"])
                reference.append(reference_images_per_s(cfg, f"{tmp}/reference{r}"))
                common.log(f"[stream] round {r + 1}: in-memory reference {reference[-1]:.1f} img/s")
            never_figures = train_and_measure(train_config(data_uri, tmp, "stream_never", epochs + 1, model,
                                                           data={"materialize": "never"}), memory=False)
            common.log(f"[stream] read every epoch: {never_figures}")
            streamed, reference = statistics.median(streamed), statistics.median(reference)
            never = never_figures["images_per_s"]
            common.log(f"[stream] genray {streamed:.1f} img/s (read every epoch: {never:.1f}), in-memory reference "
                       f"{reference:.1f} img/s")
            result["stream_images_per_s"], result["memory_images_per_s"] = round(streamed, 1), round(reference, 1)
            result["stream_vs_memory"] = round(streamed / reference, 3)
            result["stream_rounds"] = rounds
            # The same with the files read and decoded again every epoch (what a dataset too large to keep does).
            result["stream_every_epoch_vs_memory"] = round(never / reference, 3)
        if "shards" in parts:
            # [3] The same images as loose PNGs and as tar shards in S3, every request delayed like a remote store.
            loose, sharded = f"{common.BUCKET}/loose", f"{common.BUCKET}/shards"
            write_crops(loose, small)
            num_shards = write_shards(sharded, small, shard_size=max(1, small // 4))
            pattern = f"{sharded}/shard-{{000000..{num_shards - 1:06d}}}.tar"
            light = {**denoiser, "depth": 3, "width": 8, "patch": 32}  # reading, not compute, sets the pace
            s3.set_latency(args.latency_ms)
            rates = {}
            for label, uri in (("loose", loose), ("shards", pattern)):
                cfg = train_config(uri, tmp, f"io_{label}", epochs + 1, light, data={"materialize": "never"})
                figures = train_and_measure(cfg)
                rates[label] = figures["images_per_s"]
                common.log(f"[shards] {label}: {figures}")
            s3.set_latency(0)
            result["loose_images_per_s"], result["shards_images_per_s"] = round(rates["loose"], 1), \
                round(rates["shards"], 1)
            result["shards_vs_loose"] = round(rates["shards"] / rates["loose"], 3)
            result["s3_latency_ms"] = args.latency_ms
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
