"""Shared pieces of the bulk-job benchmarks: a local S3 server + Ray session, LR photo crops, a random-init
SRResNet artefact, and peak-memory sampling of a process tree from /proc (psutil is not installed).

Not a benchmark itself (`make bench` skips files starting with `_`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator

import numpy as np

from genray import storage
from genray.model_artifact import save_artifact
from genray.datasets import load_embedded
from genray.images import encode_png
from genray.models import get_spec
from genray.s3server import LocalS3Server

BUCKET = "s3://genray-bench"
# A CPU-sized SRResNet (paper: 64 features, 16 blocks). Random init: throughput and memory do not depend on the
# weights, only on the architecture and the image sizes.
SRRESNET = {"num_features": 32, "num_blocks": 8}


def log(*parts) -> None:
    """Progress goes to stderr: stdout ends with the one JSON line."""
    print(*parts, file=sys.stderr, flush=True)


@contextlib.contextmanager
def local_s3(latency_ms: float | None = None) -> Iterator[LocalS3Server]:
    """A LocalS3Server with BUCKET created, its AWS_* variables in os.environ (set before ray.init, so Ray
    workers inherit them); stopped and the environment restored on exit, error or not. latency_ms: see
    LocalS3Server (then s3.set_latency() changes it)."""
    saved = dict(os.environ)
    with LocalS3Server(latency_ms=latency_ms) as s3:
        try:
            os.environ.update(s3.env())
            storage.ensure_bucket(BUCKET)
            yield s3
        finally:
            os.environ.clear()
            os.environ.update(saved)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    import ray

    # Ray starts its workers at nice 15 by default. The ceiling and naive figures run in this (nice 0) process, so
    # on a machine shared with other work the model actors would lose CPU to it that the baselines do not.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def lr_crops(count: int, size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """`count` uint8 (size, size, 3) crops of the embedded photos, cycling through the photos, at random corners."""
    photos, _, _ = load_embedded("photos")
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        if min(h, w) < size:  # the smallest photo is 300 px: only for large crops
            reps = (-(-size // h), -(-size // w), 1)
            photo = np.tile(photo, reps)
            h, w = photo.shape[:2]
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        yield np.ascontiguousarray(photo[y:y + size, x:x + size])


def upload_pngs(prefix_uri: str, images) -> list[str]:
    """Write each image as <prefix>/img_NNNNN.png; returns the keys. Takes an iterator so callers need not hold
    every image in memory."""
    keys = []
    for i, image in enumerate(images):
        key = f"img_{i:05d}.png"
        storage.write_bytes(storage.join_uri(prefix_uri, key), encode_png(image))
        keys.append(key)
    return keys


def save_srresnet(uri: str, seed: int = 0) -> dict:
    """Save a random-init SRResNet (SRRESNET sizes, x4) as a model artefact; returns its model.json."""
    import torch

    spec = get_spec("srgan")
    cfg = spec.config_cls(**SRRESNET)
    torch.manual_seed(seed)
    model = spec.build(cfg).eval()
    return save_artifact(uri, spec, cfg, model, metrics={}, extra={"note": "random init, benchmark only"})


# ------------------------------------------------------------------------------------- memory from /proc

def status_kb(pid: int, field: str) -> int:
    """A 'kB' field of /proc/<pid>/status (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size: RSS with each shared page (libtorch, Ray's shared-memory object store) split
    between the processes that map it, so a sum over processes counts it once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def descendants(root: int, exclude: set[int]) -> list[int]:
    """root and every process below it, leaving out the subtrees of `exclude` (e.g. the S3 server)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid in exclude:
            continue
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


class TreeMemory:
    """Samples, every `interval` s in a background thread, the summed RSS and PSS of this process and its
    descendants (minus `exclude`), and the peak RSS (VmHWM, the kernel's own high-water mark, so nothing is
    missed between samples) of processes whose command line contains `marker` (Ray names an actor's worker
    process after its class, e.g. 'ray::MapWorker(MapBatches(ProcessImages))').

    A sample is a snapshot: a peak shorter than `interval` can be missed by the sums, never by the VmHWM figure.
    """

    def __init__(self, exclude: set[int] | None = None, marker: str = "ProcessImages", interval: float = 0.1):
        self.exclude, self.marker, self.interval = exclude or set(), marker, interval
        self.peak_rss_kb = self.peak_pss_kb = self.peak_marked_kb = self.peak_marked_anon_kb = 0
        self.num_marked = 0
        self._marked: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        pids = descendants(os.getpid(), self.exclude)
        self.peak_rss_kb = max(self.peak_rss_kb, sum(status_kb(p, "VmRSS") for p in pids))
        self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in pids))
        for pid in pids:
            if pid in self._marked or self.marker in cmdline(pid):
                self._marked.add(pid)
                self.peak_marked_kb = max(self.peak_marked_kb, status_kb(pid, "VmHWM"))
                # private memory alone (sampled): VmHWM also counts shared pages, e.g. object-store blocks read
                self.peak_marked_anon_kb = max(self.peak_marked_anon_kb, status_kb(pid, "RssAnon"))
        self.num_marked = len(self._marked)

    def figures(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            f"{prefix}peak_pss_mb": round(self.peak_pss_kb / 1024, 1),
            f"{prefix}model_actor_peak_rss_mb": round(self.peak_marked_kb / 1024, 1),
        }


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result
