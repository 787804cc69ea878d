"""Autoscaling on a local Ray: replicas of a model deployment scale up under load and back down after it."""
from __future__ import annotations

import threading
import time

import numpy as np
import requests

from genray.images import encode_png


def running_replicas(deployment: str, app: str = "genray") -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return sum(count for state, count in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def wait_for(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.25)
    return time.monotonic() - started


def test_replicas_follow_the_load(serve_app, serve_family_uris):
    # Short delays and windows so the test takes seconds; production values are in configs/serve/*.yaml.
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
               "downscale_delay_s": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5}
    base = serve_app({"models": {"denoise": {"uri": serve_family_uris["models"]["photo_denoiser"], "num_cpus": 0.25,
                                             "max_batch_size": 2, "autoscaling": scaling}}})
    assert running_replicas("model-denoise") == 1
    upload = encode_png(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    stop, codes = threading.Event(), []

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                codes.append(session.post(f"{base}/denoise", data=upload, timeout=60).status_code)

    # Six clients keep about six requests in flight against a target of one per replica: scale to the max.
    clients = [threading.Thread(target=client) for _ in range(6)]
    for t in clients:
        t.start()
    try:
        up = wait_for(lambda: running_replicas("model-denoise") == 2, 90, "scale up to 2 replicas under load")
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert codes and set(codes) == {200}, set(codes)  # scaling up drops no request
    down = wait_for(lambda: running_replicas("model-denoise") == 1, 90, "scale back down to 1 when idle")
    print(f"scaled up in {up:.1f} s under load ({len(codes)} requests), down in {down:.1f} s when idle")
    assert requests.post(f"{base}/denoise", data=upload, timeout=60).status_code == 200
