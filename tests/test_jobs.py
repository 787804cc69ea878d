"""jobs/*.py: importable `main(argv)` entry points with a `--smoke-test`, run through Ray's own `ray job submit` on
the local multi-node cluster."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genray import storage
from genray.cli import build_parser
from genray.config import load_config

from helpers import free_port, read_manifest_table

pytestmark = pytest.mark.integration  # drives the genray CLI or jobs as subprocesses

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def load_entry_point(name: str):
    spec = importlib.util.spec_from_file_location(f"genray_jobs_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ray_job_submit(cluster, *entrypoint: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit` (blocking: it streams the job's logs and fails if the job fails), token from the env."""
    return subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
                           "--runtime-env-json", json.dumps({"excludes": [".git", ".venv"]}), "--", *entrypoint],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **cluster.client_env()})


@pytest.mark.parametrize("name", ["train", "process", "serve", "pipeline"])
def test_entry_points_are_importable_and_document_their_smoke_test(name):
    module = load_entry_point(name)
    assert callable(module.main)
    assert "--smoke-test" in module.__doc__ and "ray job submit" in module.__doc__


def test_train_smoke_test_writes_its_data_and_a_valid_run(tmp_path):
    args = load_entry_point("train").smoke_test_args(["--output", str(tmp_path), "--set", "train.lr=0.01"])
    data = tmp_path / "smoke-data"
    assert len(list((data / "train").rglob("*.png"))) == 64 and len(list((data / "test").rglob("*.png"))) == 16
    ns = build_parser().parse_args(["train", *args])  # what genray train receives
    cfg = load_config(ns.config, list(ns.set) + [f"output_uri={ns.output}"])
    assert (cfg.name, cfg.train.epochs, cfg.train.lr, cfg.scaling.num_workers) == ("smoke_denoise_ae", 1, 0.01, 2)
    assert cfg.data.uri == f"{data}/train/" and cfg.output_uri == str(tmp_path)


def test_process_smoke_test_through_ray_job_submit(ray_cluster, s3_bucket):
    out = f"{s3_bucket}/smoke"
    r = ray_job_submit(ray_cluster, "python", "jobs/process.py", "--smoke-test", "--output", out,
                       "--concurrency", "2", "--batch-size", "1")  # 12 batches: both actors get some
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "ok            12" in r.stdout  # the job's summary table, streamed by `ray job submit`
    rows = read_manifest_table(f"{out}/smoke-out").to_pylist()
    assert len(rows) == 12 and {row["status"] for row in rows} == {"ok"}
    names = ray_cluster.names()
    per_node = {names[row["node_id"]] for row in rows}
    print(f"\n[placement] process smoke test: rows by node {sorted(per_node)}")
    # Model actors spread over both worker nodes (one CPU each), never on the 0-CPU head.
    assert per_node == set(ray_cluster.workers())


def test_train_smoke_test_through_ray_job_submit(ray_cluster, s3_bucket):
    out = f"{s3_bucket}/smoke"
    r = ray_job_submit(ray_cluster, "python", "jobs/train.py", "--smoke-test", "--output", out)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "[genray] trained denoise_ae 'smoke_denoise_ae'" in r.stdout
    assert storage.exists(f"{out}/model/model.json")


def test_pipeline_smoke_test_through_ray_job_submit(ray_cluster, s3_bucket):
    out = f"{s3_bucket}/pipeline-smoke"
    r = ray_job_submit(ray_cluster, "python", "jobs/pipeline.py", "--smoke-test", "--output", out)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "[pipeline] gate: psnr_gain_over_noisy_db >= 0.5: " in r.stdout and "-> pass" in r.stdout
    stages = json.loads(storage.read_bytes(f"{out}/run/state.json"))["stages"]
    assert {k: v["status"] for k, v in stages.items()} == {"train": "done", "eval": "done", "gate": "done",
                                                            "bulk:digits": "done"}
    assert stages["bulk:digits"]["counts"]["ok"] == 16


def test_serve_smoke_test_through_ray_job_submit(ray_cluster, s3_bucket):
    r = ray_job_submit(ray_cluster, "python", "jobs/serve.py", "--smoke-test", "--port", str(free_port()),
                       "--output", f"{s3_bucket}/serve-smoke")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "healthy at" in r.stdout and "POST /denoise -> 200 (28, 28, 1)" in r.stdout
