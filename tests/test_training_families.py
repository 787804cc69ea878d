"""Every registered family trains its tiny config (configs/tiny/<family>.yaml) through a real 2-worker Ray Train run on a few images in the real S3 server,
and a training worker killed mid-run is replaced and the run resumes from its last checkpoint."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from genray import storage
from genray.model_artifact import load_artifact
from genray.config import load_config, read_yaml
from genray.models import MODELS
from genray.training.trainer import run_training

from helpers import read_history, tiny_train_config



@pytest.mark.parametrize("family", sorted(MODELS))
def test_tiny_config_trains_on_two_workers(family, ray_local, digits_uri, photos_uri, s3_bucket):
    path = Path("configs/tiny") / f"{family}.yaml"  # test_config checks it exists and its model is tiny()
    raw = read_yaml(path)
    # The tiny configs read s3://genray-data/...; the session fixtures put the same layout in genray-test-data.
    moved = {k: raw["data"][k].replace("s3://genray-data/", "s3://genray-test-data/")
             for k in ("uri", "held_out_uri") if raw["data"].get(k)}
    out = f"{s3_bucket}/{path.stem}"
    cfg = load_config(path, [f"data.{k}={v}" for k, v in moved.items()] + [f"output_uri={out}"])
    assert cfg.scaling.num_workers == 2

    result = run_training(cfg)

    keys = {o.key for o in storage.list_objects(out)}
    assert any(k.startswith(f"checkpoints/{cfg.name}/checkpoint_") for k in keys), sorted(keys)[:20]
    expected = {f"samples/epoch_{e:03d}.png" for e in range(1, cfg.train.epochs + 1)}
    assert expected | {"samples/progress.gif", "metrics.jsonl", "loss.png", "model/model.json"} <= keys
    history = read_history(out)
    assert [r["epoch"] for r in history] == list(range(1, cfg.train.epochs + 1))
    assert all(r["world_size"] == 2 for r in history)
    spec, _, _, meta = load_artifact(result.model_uri)
    assert meta["family"] == spec.name == cfg.model.family and meta["num_workers"] == 2
    assert meta["metrics"]["epoch"] == cfg.train.epochs


def test_killed_worker_is_replaced_and_the_run_resumes(ray_local, digits_uri, s3_bucket):
    out = f"{s3_bucket}/kill"
    cfg = tiny_train_config(digits_uri, out, name="kill", epochs=30, max_failures=1, checkpoint_every=1)
    results, errors = [], []
    runner = threading.Thread(target=lambda: _run(cfg, results, errors))
    runner.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait for a couple of checkpointed epochs
        if storage.exists(f"{out}/metrics.jsonl") and len(read_history(out)) >= 3:
            break
        time.sleep(0.2)
    before = read_history(out)[-1]
    os.kill(before["worker_pids"][1], signal.SIGKILL)  # the rank-1 training worker process
    runner.join(timeout=300)
    assert not runner.is_alive() and not errors, errors
    history = read_history(out)
    assert [r["epoch"] for r in history] == list(range(1, 31))  # every epoch once: nothing lost or repeated
    resumed = [r for r in history if "resumed_after_epoch" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_after_epoch"] >= 2
    assert resumed[0]["epoch"] == resumed[0]["resumed_after_epoch"] + 1
    assert history[-1]["step"] == 30 * history[0]["step"]  # the optimizer step count carried over
    assert before["worker_pids"][1] not in history[-1]["worker_pids"]  # a new worker process took its place


def _run(cfg, results, errors):
    try:
        results.append(run_training(cfg))
    except Exception as err:  # noqa: BLE001 - reported by the test
        errors.append(err)
