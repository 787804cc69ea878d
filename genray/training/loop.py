"""The one Ray Train loop. Nothing in this file knows any model family: each family's ModelSpec supplies
init_training / train_step / sample_grid, and this loop does data sharding, DDP, checkpoints, resume and outputs.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from genray.config import TrainConfig, TrainParams
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from genray.datasets import labels_from_keys, read_image_prefix
from genray.models import get_spec
from genray.models.data import build_dataset, fixed_batch
from genray.models.layers import unwrap
from genray.training import outputs

CHECKPOINT_FILE = "state.pt"


def load_training_data(cfg: TrainConfig, spec) -> Dataset:
    """The family's training dataset over every image under data.uri (labels from a <label>/ folder layout)."""
    images, keys = read_image_prefix(cfg.data.uri, channels=spec.in_channels(cfg.model), limit=cfg.data.limit)
    return build_dataset(spec, images, labels_from_keys(keys), cfg.model)


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(b, device) for b in batch)


def mean_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def worker_placement() -> dict[str, list]:
    """pid and Ray node id of every worker (rank order), recorded in the metrics to show where the run ran."""
    info = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
    everyone = [info]
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, info)
    return {"worker_pids": [w["pid"] for w in everyone], "worker_nodes": [w["node_id"] for w in everyone]}


def lr_factor(train: TrainParams, epoch: int) -> float:
    """The schedule's multiplier on each optimizer's initial lr for 1-based `epoch` (a function of the epoch
    alone, so a resumed run continues the same curve). Cosine: 1 at epoch 1, approaching lr_min_factor as the
    last epoch ends (the last epoch still trains with a small nonzero lr)."""
    if train.lr_schedule == "constant":
        return 1.0
    progress = (epoch - 1) / train.epochs  # 0 at the first epoch, 1 - 1/epochs at the last
    return train.lr_min_factor + (1 - train.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = TrainConfig.model_validate(config)  # validated again here: the worker may run other code than the driver
    spec = get_spec(cfg.model.family)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    # Each worker gets one intra-op thread by default on CPU-only clusters; honour what Ray reserved.
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    # [1] Data: every worker reads the prefix; a DistributedSampler gives each an equal shard (DDP needs equal
    # step counts), reshuffled every epoch.
    dataset = load_training_data(cfg, spec)
    if len(dataset) < world:
        raise ValueError(f"{cfg.data.uri}: {len(dataset)} training items cannot be split over {world} workers")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler)
    fixed = to_device(fixed_batch(dataset, cfg.train.num_samples), device)  # the same items in every grid

    # [2] Modules and optimizers; resume from the latest checkpoint if this run has one.
    state = spec.init_training(cfg.model, cfg.train.lr)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            saved = torch.load(os.path.join(ckpt_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        for name, module in state.modules.items():
            module.load_state_dict(saved["modules"][name])
        for name, opt in state.optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        start_epoch, history, state.step = saved["epoch"], saved["history"], saved["step"]
        if rank == 0:
            print(f"[genray] resuming {cfg.name} after epoch {start_epoch}")
    # Each module is wrapped in DDP on its own, so a GAN's D and G updates stay separate. Modules with nothing to
    # train (an EMA copy, a frozen VGG) only move to the device: DDP refuses them.
    state.modules = {
        name: ray.train.torch.prepare_model(m) if any(p.requires_grad for p in m.parameters()) else m.to(device)
        for name, m in state.modules.items()
    }
    for opt in state.optimizers.values():  # the lr each schedule factor multiplies (kept in checkpoints)
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    for opt in state.optimizers.values():  # optimizer state loaded on CPU follows the params to the device
        for s in opt.state.values():
            for k, v in s.items():
                if torch.is_tensor(v) and k != "step":
                    s[k] = v.to(device)

    placement = worker_placement()

    # [3] Epochs.
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        for m in state.modules.values():
            m.train()
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)  # e.g. new random crops
        state.epoch = epoch
        factor = lr_factor(cfg.train, epoch)
        for opt in state.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        started = time.perf_counter()
        sums: dict[str, float] = {}
        num_steps, num_items = 0, 0
        for batch in loader:
            batch = to_device(batch, device)
            losses = spec.train_step(state, batch)
            state.step += 1
            num_steps += 1
            num_items += len(batch) if torch.is_tensor(batch) else len(batch[0])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
        seconds = time.perf_counter() - started
        metrics = mean_across_workers({k: v / num_steps for k, v in sums.items()}, device)
        metrics.update(epoch=epoch, step=state.step, lr_factor=round(factor, 6), epoch_seconds=round(seconds, 4),
                       images_per_s=round(num_items * world / max(seconds, 1e-9), 2), world_size=world,
                       **placement)
        if checkpoint and epoch == start_epoch + 1:
            metrics["resumed_after_epoch"] = start_epoch  # this attempt started from a checkpoint
        history.append(metrics)
        # Metrics every epoch; a checkpoint every `checkpoint_every` epochs and at the end.
        with_checkpoint = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs
        report(cfg, spec, state, metrics, history, fixed, epoch, rank, with_checkpoint)


def report(cfg: TrainConfig, spec, state, metrics, history, fixed, epoch: int, rank: int, with_checkpoint: bool) -> None:
    """Rank 0 writes outputs (and a checkpoint); every rank calls ray.train.report (it is a barrier)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    modules = {name: unwrap(m).eval() for name, m in state.modules.items()}
    outputs.write_sample_grid(cfg.output_uri, epoch, spec.sample_grid(modules, fixed, cfg.model))
    outputs.write_metrics(cfg.output_uri, history)
    outputs.write_loss_plot(cfg.output_uri, history)
    losses = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "loss" in k)
    print(f"[genray] epoch {epoch}/{cfg.train.epochs} {losses} {metrics['images_per_s']:.0f} img/s "
          f"({metrics['epoch_seconds']:.1f}s){' checkpoint' if with_checkpoint else ''}", flush=True)
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({
            "modules": {n: unwrap(m).state_dict() for n, m in state.modules.items()},
            "optimizers": {n: o.state_dict() for n, o in state.optimizers.items()},
            "epoch": epoch, "step": state.step, "history": history,
        }, os.path.join(tmp, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
