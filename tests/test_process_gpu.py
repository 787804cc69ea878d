"""GPU bulk jobs: GPU shares per model actor and an elastic actor pool, scheduled on a local multi-node Ray whose
worker nodes declare logical GPUs (this host has no physical one: the Predictor falls back to CPU), plus the
Predictor's precision and device choice and the config/CLI keys."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from genray import storage
from genray.config import ProcessConfig
from genray.images import encode_png
from genray.inference import Predictor, pick_device
from genray.submit import wait_until_done

from helpers import read_manifest_table, save_untrained_artifact

REPO = str(Path(__file__).resolve().parent.parent)


def test_precision_and_device_fallback(tmp_path):
    uri = save_untrained_artifact(str(tmp_path / "sr"), "srgan")
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    lines: list[str] = []
    device = pick_device(True, log=lines.append)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        assert "CUDA is not available" in lines[0]
    assert pick_device(False).type == "cpu"
    fp32 = Predictor.from_uri(uri, device="cpu")
    assert fp32.precision == "fp32" and fp32.autocast_dtype is None  # the CPU default
    want = fp32([image])[0].astype(int)
    for precision in ("bf16", "fp16"):  # autocast on CPU when asked: close to fp32, not equal
        got = Predictor.from_uri(uri, device="cpu", precision=precision)([image])[0].astype(int)
        assert got.shape == want.shape and np.abs(got - want).mean() < 8
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Predictor.from_uri(uri, device="cpu", precision="fp8")


def test_config_and_flags_for_gpu_jobs():
    from genray.cli import build_parser, process_config_from_args

    args = build_parser().parse_args(["process", "superres", "--input", "in", "--output", "out", "--model", "m",
                                      "--gpus-per-actor", "0.5", "--concurrency", "2-4", "--precision", "bf16",
                                      "--verify-outputs", "--no-overlap-io"])
    cfg = process_config_from_args(args)
    assert (cfg.gpus_per_actor, cfg.min_actors, cfg.max_actors, cfg.precision) == (0.5, 2, 4, "bf16")
    assert cfg.verify_outputs and cfg.overlap_io is False
    base = dict(task="superres", input_uri="in", output_uri="out", model_uri="m")
    assert ProcessConfig(**base, concurrency=3).max_actors == 3
    for bad, where in (({"gpus_per_actor": 1.5}, "whole number"), ({"concurrency": "4-2"}, "MIN <= MAX"),
                       ({"precision": "fp8"}, "precision")):
        with pytest.raises(Exception, match=where):
            ProcessConfig(**base, **bad)


def test_gpu_actors_two_per_gpu_node_and_a_node_added_mid_job(gpu_cluster, s3_server, s3_bucket):
    """--gpus-per-actor 0.5 --concurrency 2-4 on one node with 1 logical GPU: two actors there, none on the head
    (no GPU); a second GPU node added mid-job gets the pool's other two. The manifest's node_id shows both."""
    model_uri = save_untrained_artifact(f"{s3_bucket}/sr", "srgan")
    keys = [f"img{i:04d}.png" for i in range(600)]
    rng = np.random.default_rng(0)
    for key in keys:
        storage.write_bytes(f"{s3_bucket}/gpu-in/{key}", encode_png(rng.integers(0, 256, (32, 32, 3), np.uint8)))
    client = gpu_cluster.jobs_client()
    entrypoint = (f"python jobs/process.py superres --input {s3_bucket}/gpu-in --output {s3_bucket}/gpu-out "
                  f"--model {model_uri} --batch-size 1 --gpus-per-actor 0.5 --concurrency 2-4 "
                  f"--cpus-per-actor 0.25")
    first = gpu_cluster.workers()[0]
    ids = gpu_cluster.alive()

    def actor_nodes() -> Counter:
        return Counter(a["node_id"] for a in gpu_cluster.actors("MapWorker"))

    # The gate: until the added node has its actors, the S3 server answers every request after a second, so the
    # job waits on I/O (not on this 2-core host's CPUs, which the joining node needs) and is still running
    # however long the join takes; then the latency goes and the job's remaining work finishes in seconds.
    s3_server.set_latency(1000)
    try:
        job_id = client.submit_job(entrypoint=entrypoint,
                                   runtime_env={"working_dir": REPO, "excludes": [".git", ".venv", "tests"]})
        deadline = time.monotonic() + 600
        while actor_nodes()[ids[first]] < 2:  # [1] MIN actors, both on the one GPU node (0.5 GPU each)
            info = client.get_job_info(job_id)
            assert not info.status.is_terminal() and time.monotonic() < deadline, \
                client.get_job_logs(job_id)[-4000:]
            time.sleep(0.2)
        assert set(actor_nodes()) == {ids[first]}  # never on the head: it has no GPU
        print(f"\n[gpu] {time.strftime('%X')} 2 actors on {first}; adding a node")
        added = gpu_cluster.add_node()  # [2] a GPU node joins mid-job: the pool grows onto it (MAX 4 = 2 per node)
        new_id = gpu_cluster.alive()[added]
        deadline = time.monotonic() + 600
        while actor_nodes()[new_id] < 2:
            info = client.get_job_info(job_id)
            assert not info.status.is_terminal(), \
                f"the job ended before {added} got actors:\n{client.get_job_logs(job_id)[-3000:]}"
            assert time.monotonic() < deadline, f"no actors on {added}: {actor_nodes()}"
            time.sleep(0.5)
        print(f"[gpu] {time.strftime('%X')} {added} has 2 actors")
        assert max(actor_nodes().values()) == 2  # two per GPU node (0.5 GPU each), whatever the CPUs would allow
    finally:
        s3_server.set_latency(0)
    info = wait_until_done(client, job_id, timeout=1200)
    logs = client.get_job_logs(job_id)
    assert str(info.status) == "SUCCEEDED", logs[-4000:]
    assert "CUDA is not available here: running on CPU" in logs  # the fallback, said out loud
    rows = read_manifest_table(f"{s3_bucket}/gpu-out").to_pylist()
    assert sorted(r["input_key"] for r in rows) == keys and {r["status"] for r in rows} == {"ok"}
    names = gpu_cluster.names()
    per_node = Counter(names[r["node_id"]] for r in rows)
    assert set(per_node) == {first, added}, per_node  # the new node's actors took work; the head none
    print(f"\n[gpu] manifest rows per node {dict(per_node)}; {added} joined after the job started")
