"""The only place for fixtures: a real S3-compatible server, a real local Ray, a real Serve HTTP proxy."""
from __future__ import annotations

import inspect
import os
import secrets
import tempfile

import pytest

# Before anything imports ray: loopback-only listeners, no token auth for the test cluster, fast Train reports.
os.environ.update({
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
})
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="genray-ray-"))
# Ray's per-node agent must register within 15 s by default; on a loaded 2-core runner it has taken 22 s.
os.environ.setdefault("RAY_agent_register_timeout_ms", "60000")

import torch  # noqa: E402

# Tests run tiny models: intra-op threads only add contention on a 2-core runner (up to 40x slower steps).
# Ray workers are separate processes and set their own thread counts.
torch.set_num_threads(1)

from genray import storage  # noqa: E402
from genray.runtime import free_port  # noqa: E402
from genray.s3server import LocalS3Server  # noqa: E402

from helpers import load_ray_local, save_untrained_artifact, tiny_train_config  # noqa: E402


# Tests that use any of these need a Ray instance (a local one, Serve, or the multi-node cluster): they are the
# `integration` tier. `make test-fast` runs the rest (no Ray, no Serve, no CLI subprocess) for the edit loop;
# tests that call the CLI runner genray(...) are integration too, and modules can mark themselves (`pytestmark`).
RAY_FIXTURES = {"ray_session", "ray_local", "serve_http", "serve_app", "serve_families", "tiny_model",
                "multinode_cluster", "ray_cluster", "gpu_cluster"}


def _runs_the_cli(item) -> bool:
    """The test calls helpers.genray (the CLI as a subprocess: seconds of imports each, often a Ray job)."""
    try:
        return "genray(" in inspect.getsource(item.function)
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames) or _runs_the_cli(item):
            item.add_marker(pytest.mark.integration)
    # The multi-node cluster's tests run last, together: it starts at the first of them and, session-scoped,
    # would otherwise idle beside every later test (a head and 2 worker nodes: ~3 CPU-seconds a minute on this
    # 2-core machine doing nothing). A stable sort: the order within each group stays as collected.
    items.sort(key=lambda item: "multinode_cluster" in item.fixturenames)


@pytest.fixture(scope="session")
def s3_server():
    # latency_ms=0: no delay, but a test may set_latency() (e.g. to hold a job on I/O while a node joins).
    with LocalS3Server(latency_ms=0) as server:
        old = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        yield server
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket per test, as 's3://<name>'."""
    uri = f"s3://genray-test-{secrets.token_hex(6)}"
    storage.ensure_bucket(uri)
    return uri


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the session, started after the S3 env is set so every worker inherits it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """Per test: after a failed Train run, remove leftover placement groups so the next test is not starved."""
    yield ray_session
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for pg_id, info in placement_group_table().items():
        if info.get("state") not in ("REMOVED",):
            try:
                remove_placement_group(PlacementGroup(ray_session.PlacementGroupID.from_hex(pg_id)))
            except Exception:  # noqa: BLE001 - already gone
                pass


@pytest.fixture(scope="session")
def serve_http(ray_session):
    """Serve's HTTP proxy on 127.0.0.1 on a free port; yields the base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def serve_app(serve_http):
    """Deploy a genray app from ServeAppConfig args; every app deployed in the test is deleted after it."""
    from ray import serve

    from genray.serving.app import build_app

    names = []

    def deploy(args: dict, name: str = "genray") -> str:
        serve.run(build_app(args), name=name, route_prefix="/")
        names.append(name)
        return serve_http

    yield deploy
    for name in names:
        serve.delete(name)


# -- shared data and a trained tiny model (session-scoped: built once, read by many tests) ------------------

NUM_TRAIN_DIGITS = 96
NUM_TEST_DIGITS = 32


@pytest.fixture(scope="session")
def digits_uri(s3_server) -> str:
    """A small slice of the embedded digits in S3: <uri>/train/<label>/NNNN.png and <uri>/test/..."""
    from genray.datasets import load_embedded
    from genray.images import encode_png

    uri = "s3://genray-test-data/digits"
    storage.ensure_bucket(uri)
    images, _, keys = load_embedded("digits")
    counts = {"train": 0, "test": 0}
    for image, key in zip(images, keys):
        split = key.split("/")[0]
        if counts[split] < (NUM_TRAIN_DIGITS if split == "train" else NUM_TEST_DIGITS):
            storage.write_bytes(storage.join_uri(uri, key), encode_png(image))
            counts[split] += 1
    return uri


@pytest.fixture(scope="session")
def tiny_model(ray_session, digits_uri):
    """A tiny denoising AE trained once with 2 Ray Train workers; yields (TrainConfig, TrainResult)."""
    from genray.training.trainer import run_training

    storage.ensure_bucket("s3://genray-test-runs")
    cfg = tiny_train_config(digits_uri, "s3://genray-test-runs/tiny", epochs=4)
    return cfg, run_training(cfg)


@pytest.fixture(scope="session")
def photos_uri(s3_server) -> str:
    """The embedded photos in S3 (train/ and test/), where the tiny photo configs expect them."""
    from genray.datasets import export_dataset

    uri = "s3://genray-test-data/photos"
    storage.ensure_bucket(uri)
    export_dataset("photos", uri)
    return uri


@pytest.fixture(scope="session")
def sr_model_uri(s3_server) -> str:
    """An untrained tiny x4 SRResNet artefact in S3."""
    storage.ensure_bucket("s3://genray-test-models")
    return save_untrained_artifact("s3://genray-test-models/srgan-tiny", "srgan")


@pytest.fixture(scope="session")
def style_model_uri(s3_server) -> str:
    """An untrained tiny fast style network artefact in S3."""
    storage.ensure_bucket("s3://genray-test-models")
    return save_untrained_artifact("s3://genray-test-models/style-tiny", "style_net")


# -- Serve: every servable family as an untrained tiny artefact, and one app serving them all -----------------

@pytest.fixture(scope="session")
def serve_family_uris(s3_server, tmp_path_factory) -> dict[str, dict[str, str]]:
    """{"models": family -> artefact, "styles": style name -> artefact}: an untrained tiny artefact of every
    registered family (`serve_families` serves it as tiny-<family>: a new family gets routes and tests by registering), and
    three style networks for the multiplexed pool, differing by seed. Image models and styles in S3, the rest on
    local disk (both kinds of URI load)."""
    from genray.models import MODELS
    from genray.tasks import TASKS

    storage.ensure_bucket("s3://genray-test-models")
    s3, local = "s3://genray-test-models/serve-families", tmp_path_factory.mktemp("serve-families")
    models = {family: save_untrained_artifact(f"{s3}/{family}" if TASKS[spec.task].route == "image"
                                              else str(local / family), family)
              for family, spec in MODELS.items()}
    styles = {name: save_untrained_artifact(f"{s3}/style-{name}", "style_net", seed=seed)
              for seed, name in enumerate(("a", "b", "c"))}
    return {"models": models, "styles": styles}


@pytest.fixture(scope="module")
def serve_families(serve_http, serve_family_uris):
    """One app serving every family under /families, for one test module (its replicas hold CPU that Ray Train
    workers of later modules need). Yields (base URL, the app's args)."""
    from ray import serve

    from genray.serving.app import build_app

    small = {"num_cpus": 0.05, "max_batch_size": 4, "batch_wait_timeout_s": 0.05}
    args = {
        "models": {f"tiny-{family}": {"uri": uri, **small} for family, uri in serve_family_uris["models"].items()},
        "styles": {"uris": serve_family_uris["styles"], "max_styles_per_replica": 2, **small},
        "gateway": {"num_cpus": 0.05},
        "max_body_bytes": 2_000_000,
        "max_pixels": 1_000_000,
        "max_output_pixels": 4_000_000,
        "max_images": 32,
    }
    serve.run(build_app(args), name="families", route_prefix="/families")
    yield f"{serve_http}/families", args
    serve.delete("families")


# -- a real multi-node Ray on this host (cluster/local/ray_local.py), apart from the session's local Ray --------

@pytest.fixture(scope="session")
def multinode_cluster(s3_server):
    """A head (0 CPUs: job drivers and Ray's own services) and 2 worker nodes (1 CPU and {"worker_slot": 1} each)
    as separate process trees, with token auth and the Jobs API on 127.0.0.1. Started after the S3 env is set, so
    every node has the S3 credentials in its environment. This test process never ray.init()s it: tests reach it
    through the Jobs API and subprocess drivers only. Yields a ray_local.LocalCluster."""
    import shutil

    ray_local = load_ray_local()
    cluster_dir = tempfile.mkdtemp(prefix="grc-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        ray_local.start(cluster_dir, workers=2, head_cpus=0, worker_cpus=1, worker_resources={"worker_slot": 1})
        cluster = ray_local.LocalCluster(cluster_dir)
        yield cluster
        cluster.stop(force=True)  # nothing to drain in a throwaway cluster
    finally:
        shutil.rmtree(cluster_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster(multinode_cluster):
    """Per test: 2 live worker nodes to start from (a node-loss test may have left other ones); jobs a failed test
    left running are stopped afterwards, so they do not hold the cluster's CPUs."""
    multinode_cluster.ensure_workers(2)
    yield multinode_cluster
    client = multinode_cluster.jobs_client()
    for job in client.list_jobs():
        if not job.status.is_terminal():
            client.stop_job(job.submission_id)


@pytest.fixture(scope="module")
def gpu_cluster(s3_server):
    """A head (0 CPUs, 0 GPUs) and one worker node declaring 1 CPU and 1 *logical* GPU (this host has none: Ray
    schedules by the declared count, and genray's Predictor falls back to CPU without CUDA); add_node() adds more
    of the same. Reached through the Jobs API only, like multinode_cluster. Yields a ray_local.LocalCluster."""
    import shutil

    ray_local = load_ray_local()
    cluster_dir = tempfile.mkdtemp(prefix="grg-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        ray_local.start(cluster_dir, workers=1, head_cpus=0, worker_cpus=1, worker_gpus=1)
        cluster = ray_local.LocalCluster(cluster_dir)
        yield cluster
        cluster.stop(force=True)
    finally:
        shutil.rmtree(cluster_dir, ignore_errors=True)
