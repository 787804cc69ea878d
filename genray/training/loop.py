"""The one Ray Train loop. Nothing in this file knows any model family: each family's ModelSpec supplies
init_training / train_step / sample_grid, and this loop does data sharding, DDP, checkpoints, resume and outputs.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from typing import Any, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from genray.config import TrainConfig, TrainParams
from genray.logs import EpochLines
from genray.models import get_spec
from genray.models.data import fixed_batch, prepare_items
from genray.models.layers import unwrap
from genray.training import outputs, tracking
from genray.training.data import MAX_ERROR_KEYS, TrainingStream, sample_seed

CHECKPOINT_FILE = "state.pt"
FIXED_ROWS_KEY = "fixed_rows"  # train_loop_config entry beside the config: the sample grid's images (driver-read)


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


def all_workers_have(has_batch: bool, device: torch.device) -> bool:
    """True while every worker has a batch for this step. DDP needs the same step count everywhere, and the
    shards may differ by the files a worker skipped: a worker that runs out ends the epoch for all."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather(values: list[Any]) -> list[Any]:
    """Every worker's `values` concatenated in rank order (on every rank), e.g. the files each one skipped."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, values)
    return [e for worker in everyone for e in worker]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), recorded per epoch: streaming keeps it flat in the data size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


@contextlib.contextmanager
def autocast(precision: str, device: torch.device, scaler: "torch.amp.GradScaler | None") -> Iterator[None]:
    """The train step under autocast (bf16/fp16; fp32: nothing). With fp16 every `loss.backward()` in the
    family's train_step runs on the scaled loss and every optimizer step goes through the GradScaler (unscale,
    skip on inf/nan), then the scale is updated once per train step. Families own their update (a GAN's D then G
    in one function), so the loop applies the scaler around it rather than asking each family to."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if scaler is None:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
        return
    backward = torch.Tensor.backward

    def scaled_backward(tensor, *args, **kwargs):
        return backward(scaler.scale(tensor), *args, **kwargs)

    torch.Tensor.backward = scaled_backward
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
    finally:
        torch.Tensor.backward = backward


class ScaledOptimizer:
    """fp16: an optimizer whose step() goes through the GradScaler (grads unscaled first, the step skipped when
    they hold inf/nan); everything else (zero_grad, param_groups, state_dict) is the optimizer's own."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler"):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self, *args, **kwargs):
        return self.scaler.step(self.optimizer, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def lr_factor(train: TrainParams, epoch: int) -> float:
    """The schedule's multiplier on each optimizer's initial lr for 1-based `epoch` (a function of the epoch
    alone, so a resumed run continues the same curve). Cosine: 1 at epoch 1, approaching lr_min_factor as the
    last epoch ends (the last epoch still trains with a small nonzero lr)."""
    if train.lr_schedule == "constant":
        return 1.0
    progress = (epoch - 1) / train.epochs  # 0 at the first epoch, 1 - 1/epochs at the last
    return train.lr_min_factor + (1 - train.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def fixed_grid_batch(spec, cfg: TrainConfig, rows: list) -> Any:
    """The sample grid's batch: items of the driver-read first images, prepared as in epoch 0 (the same in every
    epoch and after a resume)."""
    items = [item for image, label, key in rows
             for item in prepare_items(spec, image, None if label < 0 else label, cfg.model,
                                       sample_seed(cfg.train.seed, 0, key))]
    return fixed_batch(items, cfg.train.num_samples)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    config = dict(config)
    fixed_rows = config.pop(FIXED_ROWS_KEY, [])
    cfg = TrainConfig.model_validate(config)  # validated again here: the worker may run other code than the driver
    spec = get_spec(cfg.model.family)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    # Each worker gets one intra-op thread by default on CPU-only clusters; honour what Ray reserved.
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    # [1] Data: this worker's shard of the Ray Data dataset the driver built (read and decoded by Ray Data tasks,
    # an equal share of the rows per worker, reshuffled every epoch); batches are prepared as they stream.
    shard = ray.train.get_dataset_shard("train")
    fixed = to_device(fixed_grid_batch(spec, cfg, fixed_rows), device) if rank == 0 and fixed_rows else None

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
    stream = TrainingStream(shard, cfg, rank, range(start_epoch + 1, cfg.train.epochs + 1))  # reads ahead from here
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

    # fp16 needs a GradScaler (small gradients underflow in half precision); bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    if scaler is not None:
        state.optimizers = {name: ScaledOptimizer(opt, scaler) for name, opt in state.optimizers.items()}
    placement = worker_placement()
    tracker = tracking.EpochTracker(cfg) if rank == 0 else None  # TensorBoard / MLflow, beside metrics.jsonl

    # [3] Epochs.
    lines = EpochLines(cfg.train.epochs, start_epoch)
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        for m in state.modules.values():
            m.train()
        state.epoch = epoch
        factor = lr_factor(cfg.train, epoch)
        for opt in state.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        started = time.perf_counter()
        sums: dict[str, float] = {}
        num_steps, num_items, errors = 0, 0, []
        batches = stream.batches(spec, epoch, errors)
        waited = 0.0  # time the steps waited for data: near 0 unless the input pipeline is the bottleneck
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if not all_workers_have(batch is not None, device):
                break
            batch = to_device(batch, device)
            with autocast(cfg.train.precision, device, scaler):
                losses = spec.train_step(state, batch)
            if scaler is not None:
                scaler.update()
            state.step += 1
            num_steps += 1
            num_items += len(batch) if torch.is_tensor(batch) else len(batch[0])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
        for _ in batches:  # stopped by another worker's end: the rows left (a short batch at most) are only counted
            pass
        if num_steps == 0:
            raise ValueError(f"{cfg.data.uri}: no training batch reached worker {rank} of {world} in epoch "
                             f"{epoch} (fewer usable images than workers?)")
        seconds = time.perf_counter() - started
        metrics = mean_across_workers({k: v / num_steps for k, v in sums.items()}, device)
        errors = gather(errors)
        peak_rss, data_waits = zip(*gather([(peak_rss_mb(), waited)]))  # every worker's, in one collective
        metrics.update(epoch=epoch, step=state.step, lr_factor=round(factor, 6), epoch_seconds=round(seconds, 4),
                       data_wait_seconds=round(max(data_waits), 4),  # the slowest worker's
                       images_per_s=round(num_items * world / max(seconds, 1e-9), 2), world_size=world,
                       data_errors=len(errors), worker_peak_rss_mb=max(peak_rss),
                       **placement)
        if errors:
            metrics["data_error_keys"] = errors[:MAX_ERROR_KEYS]  # all of them are in the workers' logs
        if checkpoint and epoch == start_epoch + 1:
            metrics["resumed_after_epoch"] = start_epoch  # this attempt started from a checkpoint
        history.append(metrics)
        # Metrics every epoch; a checkpoint every `checkpoint_every` epochs and at the end.
        with_checkpoint = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs
        report(cfg, spec, state, metrics, history, fixed, epoch, rank, with_checkpoint, lines, tracker)


def report(cfg: TrainConfig, spec, state, metrics, history, fixed, epoch: int, rank: int, with_checkpoint: bool,
           lines: EpochLines, tracker: tracking.EpochTracker | None = None) -> None:
    """Rank 0 writes outputs (and a checkpoint); every rank calls ray.train.report (it is a barrier)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    modules = {name: unwrap(m).eval() for name, m in state.modules.items()}
    grid = spec.sample_grid(modules, fixed, cfg.model) if fixed is not None else None
    if grid is not None:
        outputs.write_sample_grid(cfg.output_uri, epoch, grid)
    outputs.write_metrics(cfg.output_uri, history)
    outputs.write_loss_plot(cfg.output_uri, history)
    if tracker is not None:
        tracker.log_epoch(epoch, metrics, grid)
    losses = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "loss" in k)
    print(lines.line(epoch, f"{losses} {metrics['images_per_s']:.0f} img/s ({metrics['epoch_seconds']:.1f}s)"
                            f"{' checkpoint' if with_checkpoint else ''}"), flush=True)
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
