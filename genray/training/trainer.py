"""TorchTrainer factory and `run_training`: config in; checkpoints, outputs and the model artefact out."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from genray import storage
from genray.model_artifact import save_artifact
from genray.config import TrainConfig
from genray.models import get_spec
from genray.runtime import ray_error_line
from genray.training import outputs, tracking
from genray.datasets import TrainingDataError, list_units, read_images
from genray.training.data import build_dataset, fixed_rows
from genray.training.loop import CHECKPOINT_FILE, FIXED_ROWS_KEY, train_loop_per_worker


class TrainingError(RuntimeError):
    """The Ray Train run failed; the message carries the worker's error."""


@dataclass
class TrainResult:
    output_uri: str
    model_uri: str
    checkpoint_uri: str
    metrics: dict[str, Any]


def scaling_config(cfg: TrainConfig) -> ScalingConfig:
    """The config's `scaling` section as Ray Train's ScalingConfig."""
    return ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
        placement_strategy=cfg.scaling.placement_strategy,
    )


def check_inputs(cfg: TrainConfig) -> None:
    """The mistakes a user can fix, found before Ray starts: an output bucket that is missing or unreadable, a
    data.uri that does not exist or holds no images. Raises TrainingError with one line."""
    try:
        storage.list_objects(storage.join_uri(cfg.output_uri, "checkpoints"))
    except storage.StorageError as err:
        raise TrainingError(f"output {err}") from None
    local = cfg.data.uri.removeprefix("file://")
    if not storage.is_s3(cfg.data.uri) and "{" not in local and not os.path.exists(local):
        raise TrainingError(f"data.uri {cfg.data.uri} does not exist")
    try:
        list_units(cfg.data.uri, cfg.data, cfg.data.limit)
    except (TrainingDataError, storage.StorageError) as err:
        raise TrainingError(f"data.uri: {err}") from None


def build_trainer(cfg: TrainConfig) -> TorchTrainer:
    checkpoints_uri = storage.join_uri(cfg.output_uri, "checkpoints")
    try:  # fail before starting workers if the output bucket is missing or unreadable
        storage.list_objects(checkpoints_uri)
    except storage.StorageError as err:
        raise TrainingError(f"output {err}") from None
    fs, path = storage.pyarrow_filesystem(checkpoints_uri)
    # The data: listed here, read and decoded by Ray Data tasks, streamed to the workers (get_dataset_shard).
    # The few images of the sample grid are read here, once, so every epoch (and a resumed run) shows the same.
    channels = get_spec(cfg.model.family).in_channels(cfg.model)
    try:
        dataset = build_dataset(cfg, channels)
        grid_rows = fixed_rows(cfg, channels)
    except (TrainingDataError, storage.StorageError) as err:
        raise TrainingError(str(err)) from None
    except Exception as err:  # a materialised read that failed in a Ray Data task (data.on_error=fail)
        raise TrainingError(f"reading {cfg.data.uri} failed: {ray_error_line(err)}") from None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.model_dump_plain(), FIXED_ROWS_KEY: grid_rows},
        datasets={"train": dataset},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            # Same name + same storage = resume from the latest checkpoint (Ray Train V2's rule).
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # One intra-op thread per CPU reserved, so two workers on two cores do not oversubscribe.
            # Train V2's print patch echoes every worker print() a second time on the driver.
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cfg.scaling.cpus_per_worker))),
                                             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train on Ray Train, then evaluate the final weights on held-out data and write `<output>/model/`."""
    spec = get_spec(cfg.model.family)
    # [1] Distributed training; checkpoints go to <output>/checkpoints/<name>/. The MLflow run (if any) is opened
    # first, so a wrong tracking URI fails before any worker starts; rank 0 logs into it every epoch.
    try:
        mlflow_run = tracking.open_mlflow_run(cfg)
    except tracking.TrackingError as err:
        raise TrainingError(str(err)) from None
    try:
        result = build_trainer(cfg).fit()
    except ray.train.TrainingFailedError as err:
        if mlflow_run:
            mlflow_run.end("FAILED")
        raise TrainingError(f"training run {cfg.name!r} failed: {ray_error_line(err)}") from None
    if result.checkpoint is None:
        raise TrainingError(f"training run {cfg.name!r} finished without a checkpoint")

    # [2] Final weights from the latest checkpoint (the one Ray kept in storage).
    with result.checkpoint.as_directory() as ckpt_dir:
        saved = torch.load(os.path.join(ckpt_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model = spec.build(cfg.model)
    model.load_state_dict(saved["modules"]["model"])
    model.eval()

    # [3] Quality on held-out images, then the artefact.
    metrics: dict[str, Any] = {k: v for k, v in saved["history"][-1].items()}
    held_out: dict[str, Any] = {}
    if cfg.data.held_out_uri:  # small by nature: read in this process, any input form the training data takes
        try:
            images, labels, _ = read_images(cfg.data.held_out_uri, spec.in_channels(cfg.model), cfg.data)
        except (TrainingDataError, storage.StorageError) as err:
            raise TrainingError(f"held-out data: {err}") from None
        held_out = spec.evaluate(model, images, labels, cfg.model)
        metrics.update(held_out)
        # metrics.jsonl gets them too, on the last epoch's row as held_out_<name> (e.g. the 2-d autoencoder's
        # held_out_knn_accuracy_tsne): the run's one file of numbers holds its final quality as well.
        outputs.write_metrics(cfg.output_uri, saved["history"][:-1] + [
            {**saved["history"][-1], **{f"held_out_{k}": v for k, v in tracking.scalar_metrics(held_out).items()}}])
        for name, data in (spec.extra_outputs(model, images, labels, cfg.model) if spec.extra_outputs else {}).items():
            storage.write_bytes(storage.join_uri(cfg.output_uri, name), data)
    model_uri = storage.join_uri(cfg.output_uri, "model")
    save_artifact(model_uri, spec, cfg.model, model, metrics,
                  extra={"train": cfg.train.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
                         "precision": cfg.train.precision,
                         "run_name": cfg.name, "num_workers": cfg.scaling.num_workers})
    outputs.write_progress_gif(cfg.output_uri)
    if mlflow_run:
        mlflow_run.end("FINISHED", tracking.scalar_metrics(held_out), step=saved["epoch"], model_uri=model_uri)
    return TrainResult(cfg.output_uri, model_uri, result.checkpoint.path, metrics)
