"""Experiment tracking, read back with the tools' own readers: TensorBoard's EventAccumulator on the event files
under <output>/tensorboard/ (local and s3://), MlflowClient on a file: store."""
from __future__ import annotations

import os

import numpy as np
import pytest

from genray import storage
from genray.config import TrackingConfig
from genray.training import tracking
from genray.training.trainer import run_training

from helpers import read_history, tiny_train_config

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def read_events(output_uri: str, local_dir):
    """The run's event files (copied from storage, local or s3://) loaded by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage.download_dir(storage.join_uri(output_uri, tracking.TENSORBOARD_DIR), str(local_dir))
    events = EventAccumulator(str(local_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def session_hparams(events) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as genray does for file: stores
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_params_are_the_config_as_dotted_scalars_without_the_tracking_section(tmp_path):
    cfg = tiny_train_config("s3://b/digits", str(tmp_path), epochs=3)
    cfg = cfg.model_copy(update={"tracking": TrackingConfig(mlflow_uri="http://user@127.0.0.1:1")})
    params = tracking.flat_params(cfg)
    assert params["train.epochs"] == 3 and params["model.family"] == "denoise_ae" and params["name"] == "tiny"
    assert params["data.limit"] == "null"  # None and lists as JSON text: hparams and MLflow take scalars only
    assert not any(k.startswith("tracking") for k in params)
    assert tracking.scalar_metrics({"epoch": 2, "step": 8, "loss": 0.5, "worker_pids": [1, 2], "data_errors": 0,
                                    "resumed": True}) == {"loss": 0.5, "data_errors": 0.0}


def test_a_resumed_attempt_logs_into_the_same_mlflow_run_and_a_new_event_file(s3_bucket, tmp_path):
    """Without Ray: two trackers in a row stand for a first attempt and a resumed one on an s3:// output."""
    store = f"file:{tmp_path}/mlruns"
    cfg = tiny_train_config("s3://b/digits", f"{s3_bucket}/out", name="resumed", epochs=3)
    cfg = cfg.model_copy(update={"tracking": TrackingConfig(mlflow_uri=store)})
    grid = np.zeros((20, 30, 3), np.uint8)
    first = tracking.EpochTracker(cfg)
    for epoch in (1, 2):
        first.log_epoch(epoch, {"epoch": epoch, "loss": 1.0 / epoch}, grid)
    second = tracking.EpochTracker(cfg)  # resumed after epoch 2: a new process finds the run by its tags
    second.log_epoch(3, {"epoch": 3, "loss": 0.25}, grid)
    assert second.mlflow.run_id == first.mlflow.run_id
    history = mlflow_client(store).get_metric_history(first.mlflow.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    events = read_events(cfg.output_uri, tmp_path / "tb")
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert len(storage.list_objects(storage.join_uri(cfg.output_uri, tracking.TENSORBOARD_DIR))) == 2


def test_a_bad_mlflow_uri_fails_before_any_worker_starts(tmp_path):
    cfg = tiny_train_config("s3://b/digits", str(tmp_path / "out"), epochs=1)
    cfg = cfg.model_copy(update={"tracking": TrackingConfig(mlflow_uri="nosuchscheme://x")})
    with pytest.raises(tracking.TrackingError, match="nosuchscheme"):
        tracking.open_mlflow_run(cfg)


def test_training_run_writes_tensorboard_and_mlflow(ray_local, digits_uri, tmp_path):
    store = f"file:{tmp_path}/mlruns"
    cfg = tiny_train_config(digits_uri, str(tmp_path / "out"), name="tracked", epochs=2)
    cfg = cfg.model_copy(update={"tracking": TrackingConfig(mlflow_uri=store, mlflow_experiment="tiny")})
    run_training(cfg)
    history = read_history(cfg.output_uri)

    # TensorBoard: every metrics.jsonl number per epoch, the sample grid per epoch, the config as hparams.
    events = read_events(cfg.output_uri, tmp_path / "tb")
    for key in ("loss", "images_per_s", "epoch_seconds", "lr_factor"):  # event files hold float32
        assert [(s.step, np.float32(s.value)) for s in events.Scalars(key)] == \
            [(row["epoch"], np.float32(row[key])) for row in history]
    images = events.Images(tracking.SAMPLES_TAG)
    assert [i.step for i in images] == [1, 2] and images[0].width > cfg.train.num_samples * 28
    hparams = session_hparams(events)
    assert hparams["train.epochs"] == 2 and hparams["model.family"] == "denoise_ae"

    # MLflow: the config as params, the metrics per epoch, the held-out metrics and the model artefact.
    client = mlflow_client(store)
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["train.epochs"] == "2" and run.data.params["scaling.num_workers"] == "2"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in loss] == [(row["epoch"], round(row["loss"], 4)) for row in history]
    assert np.isfinite(run.data.metrics["psnr_denoised_db"])
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/weights.pt", "model/model.json"} <= artefacts


def test_s3_output_event_files_land_under_the_prefix(tiny_model):
    cfg, _ = tiny_model  # the session's 2-worker run on an s3:// output (tracking defaults: TensorBoard on)
    keys = [o.key for o in storage.list_objects(storage.join_uri(cfg.output_uri, tracking.TENSORBOARD_DIR))]
    assert keys and all(k.startswith("events.out.tfevents.") for k in keys)
    # TensorBoard reads s3:// itself (boto3, the AWS_* variables): what `tensorboard --logdir s3://...` does.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(storage.join_uri(cfg.output_uri, tracking.TENSORBOARD_DIR), size_guidance={"images": 0})
    events.Reload()
    assert [s.step for s in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [i.step for i in events.Images(tracking.SAMPLES_TAG)] == [1, 2, 3, 4]
