"""Experiment tracking where Ray users look for it: TensorBoard and MLflow.

- TensorBoard: rank 0 writes event files (every numeric metric and the sample grid per epoch, the config as
  hparams) to a local temp dir and copies them to `<output>/tensorboard/` after each epoch through
  genray.storage, so a local output and an s3:// output take the same path. `tensorboard --logdir` reads them.
- MLflow (with `tracking.mlflow_uri`): one run per training run, found by tags (run name + output), so the
  driver, rank 0 and a resumed attempt all log into the run the first one created. The driver opens it before
  any worker starts (a bad URI fails there), rank 0 logs the metrics per epoch, and the driver ends it with the
  held-out metrics and the model artefact `<output>/model/` under the run's `model/` artefacts.

tensorboard and mlflow come with the `tracking` extra and are imported here only: without tensorboard the event
files are skipped with a warning; without mlflow a config that asks for it fails with the install line.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from genray import storage
from genray.config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
SAMPLES_TAG = "samples"
RUN_NAME_TAG, OUTPUT_TAG = "genray.run_name", "genray.output_uri"
NOT_SCALARS = {"epoch", "step", "world_size"}  # the x axis and constants, not curves
INSTALL_HINT = "pip install 'genray[tracking]'"


class TrackingError(RuntimeError):
    """Tracking was asked for but cannot work (package missing, tracking server unreachable)."""


def _walk(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(f"{prefix}.{key}" if prefix else key, item)
    elif isinstance(value, (bool, int, float, str)):
        yield prefix, value
    else:  # None, lists: hparams and MLflow params take scalars only
        yield prefix, json.dumps(value)


def flat_params(cfg: TrainConfig) -> dict[str, bool | int | float | str]:
    """The config as dotted keys (`train.lr`, `model.latent_dim`) with scalar values. The tracking section stays
    out: a tracking URI may carry a user name, and it says nothing about the model."""
    tree = cfg.model_dump(mode="json", exclude={"tracking"})
    return dict(_walk("", tree))


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The curves of one epoch's metrics row: numbers except the epoch/step counters (lists and ids stay out)."""
    return {k: float(v) for k, v in metrics.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- TensorBoard ----------------------------------------------------------------------------------------------

class TensorBoardLog:
    """A SummaryWriter on a local temp dir, mirrored to `<output>/tensorboard/` after every epoch. An event file
    only grows, so each copy replaces the last; a resumed attempt writes a new file beside the old ones, which
    TensorBoard reads as one run."""

    def __init__(self, output_uri: str):
        from torch.utils.tensorboard import SummaryWriter

        self.uri = storage.join_uri(output_uri, TENSORBOARD_DIR)
        self.local_dir = tempfile.mkdtemp(prefix="genray-tb-")
        self.writer = SummaryWriter(self.local_dir)
        self.wrote_hparams = False

    def log_epoch(self, epoch: int, scalars: dict[str, float], grid: np.ndarray | None,
                  hparams: dict[str, Any]) -> None:
        if not self.wrote_hparams:
            # Written into this run (SummaryWriter.add_hparams would make a sub-run); the metric names link the
            # HPARAMS tab to the scalar curves of the same names.
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            for summary in hparams_summaries(hparams, {k: v for k, v in scalars.items()}):
                self.writer.file_writer.add_summary(summary)
            self.wrote_hparams = True
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, epoch)
        if grid is not None:  # uint8 (H, W, C) or (H, W)
            self.writer.add_image(SAMPLES_TAG, grid, epoch, dataformats="HWC" if grid.ndim == 3 else "HW")
        self.writer.flush()
        storage.upload_dir(self.local_dir, self.uri)

    def close(self) -> None:
        self.writer.close()
        storage.upload_dir(self.local_dir, self.uri)
        shutil.rmtree(self.local_dir, ignore_errors=True)


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


# -- MLflow ---------------------------------------------------------------------------------------------------

@dataclass
class MlflowRun:
    client: Any  # mlflow.tracking.MlflowClient
    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        for i in range(0, len(rows), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def end(self, status: str, metrics: dict[str, float] | None = None, step: int = 0,
            model_uri: str | None = None) -> None:
        """Held-out metrics, the model artefact (copied from storage, local or s3://) and the final status."""
        if metrics:
            self.log_metrics(metrics, step)
        if model_uri:
            with tempfile.TemporaryDirectory(prefix="genray-mlflow-") as tmp:
                storage.download_dir(model_uri, tmp)
                self.client.log_artifacts(self.run_id, tmp, artifact_path="model")
        self.client.set_terminated(self.run_id, status=status)


def open_mlflow_run(cfg: TrainConfig) -> MlflowRun | None:
    """This training run's MLflow run (None without tracking.mlflow_uri): the newest run tagged with its name and
    output in the experiment, or a new one with the config as params."""
    uri = cfg.tracking.mlflow_uri
    if not uri:
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError(f"tracking.mlflow_uri is set but mlflow is not installed: {INSTALL_HINT}")
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked; genray documents it as
        # the zero-setup store (the MLflow UI reads it with the same variable set).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        name = cfg.tracking.mlflow_experiment
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        # The run name is a safe token (TrainConfig.name's pattern); the output is compared here, not quoted.
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.name}'",
                                  order_by=["attributes.start_time DESC"])
        run = next((r for r in runs if r.data.tags.get(OUTPUT_TAG) == cfg.output_uri), None)
        if run is not None:
            if run.info.status != "RUNNING":  # a rerun continues (resumes) a run that had ended
                client.update_run(run.info.run_id, status="RUNNING")
            return MlflowRun(client, run.info.run_id)
        run = client.create_run(experiment_id, run_name=cfg.name,
                                tags={RUN_NAME_TAG: cfg.name, OUTPUT_TAG: cfg.output_uri,
                                      "genray.family": cfg.model.family})
        params = [Param(k, str(v)) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        return MlflowRun(client, run.info.run_id)
    except MlflowException as err:
        raise TrackingError(f"MLflow at {uri}: {err.message.splitlines()[0]}") from None


# -- Rank 0, per epoch ----------------------------------------------------------------------------------------

class EpochTracker:
    """What rank 0 logs each epoch, beside metrics.jsonl and the sample PNG (genray.training.loop.report)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tensorboard = None
        if cfg.tracking.tensorboard:
            if tensorboard_available():
                self.tensorboard = TensorBoardLog(cfg.output_uri)
            else:
                print(f"[genray] warning: tensorboard is not installed, no event files ({INSTALL_HINT})",
                      flush=True)
        self.mlflow = open_mlflow_run(cfg)

    def log_epoch(self, epoch: int, metrics: dict[str, Any], grid: np.ndarray | None) -> None:
        scalars = scalar_metrics(metrics)
        if self.tensorboard is not None:
            self.tensorboard.log_epoch(epoch, scalars, grid, flat_params(self.cfg))
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, epoch)
        if epoch == self.cfg.train.epochs and self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
