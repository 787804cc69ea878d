"""Node loss on a real multi-node Ray (cluster/local/ray_local.py: a 0-CPU head and worker nodes, each its own
process tree): a training run loses a worker node mid-run and resumes from its last checkpoint in S3 once a node
is added back; a bulk job loses a node mid-job and still ends with every input exactly once. Both run as Ray jobs
(the Jobs SDK and the `ray job submit` CLI), so the drivers live on the cluster's head, not in this process."""
from __future__ import annotations

import pytest

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from genray import storage
from genray.images import encode_png
from genray.cli import build_job
from genray.submit import wait_until_done

from helpers import lose_the_rank1_node, read_history, read_manifest_table

pytestmark = pytest.mark.integration  # drives the genray CLI or jobs as subprocesses

REPO = str(Path(__file__).resolve().parent.parent)
RAY = str(Path(sys.executable).with_name("ray"))
TINY = "configs/tiny/denoise_ae.yaml"


def wait_until(predicate, what: str, timeout: float, job=None, poll: float = 0.2):
    """Poll `predicate` until truthy; fail early (with the job's logs) if the job ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None:
            client, job_id = job
            info = client.get_job_info(job_id)
            assert not info.status.is_terminal(), \
                f"job {info.status} before {what}:\n{client.get_job_logs(job_id)[-4000:]}"
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_training_resumes_after_losing_a_worker_node(ray_cluster, digits_uri, s3_bucket):
    out = f"{s3_bucket}/train"
    epochs = 16
    entrypoint, runtime_env, _ = build_job("train", [
        TINY, "--output", out, "--set", "name=node_loss", "--set", f"data.uri={digits_uri}/train/",
        "--set", f"data.held_out_uri={digits_uri}/test/", "--set", "data.limit=null",
        "--set", f"train.epochs={epochs}", "--set", "train.checkpoint_every=1", "--set", "train.max_failures=1",
        "--set", "scaling.resources_per_worker={worker_slot: 1}"], REPO)  # one Train worker per worker node
    client = ray_cluster.jobs_client()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    # [1] A few checkpointed epochs, one worker on each worker node.
    before = wait_until(lambda: (h := read_history(out)) and len(h) >= 3 and h, "3 checkpointed epochs", 600,
                        job=(client, job_id))[-1]

    # [2] Lose the node of the rank-1 worker (every process of it, at once), then bring capacity back.
    placed_before, killed_after, new_node = lose_the_rank1_node(ray_cluster, before, out)
    victim = placed_before[1]

    # [3] The job finishes: every epoch once, one resume from a checkpoint, the lost node replaced by the new one.
    info = wait_until_done(client, job_id, timeout=900)
    logs = client.get_job_logs(job_id)
    assert str(info.status) == "SUCCEEDED", logs[-4000:]
    history = read_history(out)
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    resumed = [r for r in history if "resumed_after_epoch" in r]
    assert len(resumed) == 1 and resumed[0]["epoch"] == resumed[0]["resumed_after_epoch"] + 1
    # From a checkpoint in S3, not from scratch; the latest registered one (the newest epoch's report may still
    # have been in flight when the node went).
    assert 1 <= resumed[0]["resumed_after_epoch"] <= killed_after
    assert f"[genray] resuming node_loss after epoch {resumed[0]['resumed_after_epoch']}" in logs
    assert history[-1]["step"] == epochs * history[0]["step"]  # optimizer steps carried over
    names = ray_cluster.names()
    placed_after = [names[n] for n in history[-1]["worker_nodes"]]
    survivor = placed_before[0]
    assert sorted(placed_after) == sorted([survivor, new_node])
    print(f"\n[placement] training: epochs 1-{killed_after} on {placed_before} (ranks 0, 1); {victim} killed; "
          f"resumed from the epoch-{resumed[0]['resumed_after_epoch']} checkpoint in S3 on {placed_after}, which "
          f"ran epochs {resumed[0]['epoch']}-{epochs}")


def _photo(seed: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = 127 + 90 * np.sin(7 * x + seed) * np.cos(5 * y) + rng.normal(0, 10, (size, size))
    return np.clip(np.repeat(image[:, :, None], 3, axis=2), 0, 255).astype(np.uint8)


def test_bulk_job_loses_a_node_and_still_does_every_input_once(ray_cluster, sr_model_uri, s3_server, s3_bucket):
    keys = [f"img{i:02d}.png" for i in range(48)]
    for i, key in enumerate(keys):
        storage.write_bytes(f"{s3_bucket}/in/{key}", encode_png(_photo(i)))
    outputs = lambda: [o.key for o in storage.list_objects(f"{s3_bucket}/out")  # noqa: E731
                       if not o.key.startswith("_manifest/")]
    args = ["python", "jobs/process.py", "superres", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out",
            "--model", sr_model_uri, "--batch-size", "1", "--concurrency", "2"]
    # Through Ray's own CLI this time, as `ray job submit` users would (the token from RAY_AUTH_TOKEN_PATH).
    r = subprocess.run([RAY, "job", "submit", "--no-wait", "--address", ray_cluster.dashboard_url,
                        "--working-dir", REPO, "--runtime-env-json", json.dumps({"excludes": [".git", ".venv"]}),
                        "--", *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, **ray_cluster.client_env()})
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", r.stdout + r.stderr).group(1)
    client = ray_cluster.jobs_client()

    survivor, victim = ray_cluster.workers()

    # [1] Both model actors up, one on each worker node, and a few outputs written since. Then freeze S3
    # (SIGSTOP): both actors hang mid-batch, so the node we kill surely takes work in flight with it, however
    # fast this machine is.
    ids = ray_cluster.alive()
    wait_until(lambda: sorted(a["node_id"] for a in ray_cluster.actors("MapWorker")) == sorted(
        ids[w] for w in (survivor, victim)), "a model actor on each worker node", 600, job=(client, job_id))
    started = len(outputs())
    wait_until(lambda: len(outputs()) >= started + 6, "outputs from both actors", 600, job=(client, job_id),
               poll=0.1)
    s3_server.pause()
    try:
        victim_id = ray_cluster.alive()[victim]
        ray_cluster.kill_node(victim)
    finally:
        s3_server.resume()
    done_at_kill = len(outputs())
    assert done_at_kill < len(keys), "the job finished before the node was lost: use more inputs"

    # [2] The surviving node keeps working while the lost one is gone; then capacity comes back.
    ray_cluster.wait_dead(victim_id)
    wait_until(lambda: len(outputs()) > done_at_kill, "progress on the surviving node", 300, job=(client, job_id))
    new_node = ray_cluster.add_node()
    info = wait_until_done(client, job_id, timeout=900)
    logs = client.get_job_logs(job_id)
    assert str(info.status) == "SUCCEEDED", logs[-4000:]

    # [3] Every input exactly once: one output each, one `ok` manifest row each.
    assert sorted(outputs()) == keys
    rows = read_manifest_table(f"{s3_bucket}/out").to_pylist()
    assert sorted(r["input_key"] for r in rows) == keys
    assert {r["status"] for r in rows} == {"ok"}
    names = ray_cluster.names()
    per_node = Counter(names[r["node_id"]] for r in rows)
    assert set(per_node) <= {survivor, victim, new_node} and per_node[survivor] > 0 and len(per_node) >= 2
    print(f"\n[placement] bulk job: manifest rows per node {dict(per_node)}; {victim} killed with "
          f"{done_at_kill}/{len(keys)} outputs written; {new_node} added afterwards")
