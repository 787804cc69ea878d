"""Training from WebDataset shards on a real multi-node Ray (cluster/local/ray_local.py): a brace pattern of tar
shards in the S3 server streams through Ray Data to 2 Train workers on 2 worker nodes; a node is killed mid-run
and the run resumes from its last checkpoint once a node is added back. (This is genray's one node-loss training
test: loose files and shards take the same Ray Data path, and loose files are tested on the local Ray.)"""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from genray import storage
from genray.datasets import load_embedded
from genray.images import encode_png
from genray.cli import build_job
from genray.submit import wait_until_done

from helpers import lose_the_rank1_node, read_history

REPO = str(Path(__file__).resolve().parent.parent)
TINY = "configs/tiny/denoise_ae.yaml"


def wait_for_epochs(output_uri: str, count: int, client, job_id: str, timeout: float) -> dict:
    """The metrics row of epoch `count` once written; fails early (with the job's logs) if the job ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = read_history(output_uri)
        if len(history) >= count:
            return history[-1]
        info = client.get_job_info(job_id)
        assert not info.status.is_terminal(), f"job {info.status}:\n{client.get_job_logs(job_id)[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {count} epochs")


def write_shards(prefix: str, num_shards: int, per_shard: int) -> str:
    """Embedded digits as tar shards (image + .json label sidecar per sample); returns their brace pattern."""
    digits, labels, _ = load_embedded("digits")
    for shard in range(num_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                for name, data in ((f"d{i:04d}.png", encode_png(digits[i])),
                                   (f"d{i:04d}.json", json.dumps({"label": int(labels[i])}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        storage.write_bytes(f"{prefix}/shard-{shard:06d}.tar", buf.getvalue())
    return f"{prefix}/shard-{{000000..{num_shards - 1:06d}}}.tar"


@pytest.mark.timeout(900)  # a multi-node cluster start, a run, a node loss and a restart on 2 shared cores
def test_training_from_shards_spreads_over_two_nodes_and_resumes_after_losing_one(ray_cluster, s3_bucket):
    pattern = write_shards(f"{s3_bucket}/shards", num_shards=4, per_shard=24)
    out = f"{s3_bucket}/train"
    epochs = 8
    entrypoint, runtime_env, _ = build_job("train", [
        TINY, "--output", out, "--set", "name=shards_node_loss", "--set", f"data.uri={pattern}",
        "--set", "data.held_out_uri=null", "--set", "data.limit=null",
        "--set", "data.materialize=never",  # every epoch streams the shards from S3
        "--set", f"train.epochs={epochs}", "--set", "train.checkpoint_every=1", "--set", "train.max_failures=1",
        "--set", "scaling.placement_strategy=SPREAD",
        "--set", "scaling.resources_per_worker={worker_slot: 1}"], REPO)  # one Train worker per worker node
    client = ray_cluster.jobs_client()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    # [1] A few checkpointed epochs, one worker on each worker node.
    before = wait_for_epochs(out, 3, client, job_id, 600)

    # [2] Lose the node of the rank-1 worker, then bring capacity back.
    placed_before, killed_after, new_node = lose_the_rank1_node(ray_cluster, before, out)

    # [3] Every epoch once, one resume from a checkpoint in S3, all 96 shard images each epoch, the same step count.
    info = wait_until_done(client, job_id, timeout=900)
    logs = client.get_job_logs(job_id)
    assert str(info.status) == "SUCCEEDED", logs[-4000:]
    history = read_history(out)
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    resumed = [r for r in history if "resumed_after_epoch" in r]
    assert len(resumed) == 1 and 1 <= resumed[0]["resumed_after_epoch"] <= killed_after
    assert history[-1]["step"] == epochs * history[0]["step"]  # 96 images / 2 workers / batch 16 = 3 steps
    assert history[0]["step"] == 3 and all(r["data_errors"] == 0 for r in history)
    names = ray_cluster.names()
    placed_after = sorted(names[n] for n in history[-1]["worker_nodes"])
    assert placed_after == sorted([placed_before[0], new_node])
    assert f"[genray] resuming shards_node_loss after epoch {resumed[0]['resumed_after_epoch']}" in logs
    print(f"\n[placement] training: epochs 1-{killed_after} on {placed_before} (ranks 0, 1); {placed_before[1]} "
          f"killed; resumed from the epoch-{resumed[0]['resumed_after_epoch']} checkpoint in S3 on {placed_after}")
