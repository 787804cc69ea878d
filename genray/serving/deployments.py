"""Model deployments of the Serve app, one class per kind of artefact, each batching concurrent requests.

ImageDeployment: image -> image through the shared Predictor (denoise, superres, dense-AE reconstruction, one style).
StylePoolDeployment: many fast style networks multiplexed over one pool of replicas (@serve.multiplexed).
GeneratorDeployment: DCGAN / VAE samples, and reconstruct / interpolate for families that have them (the VAE).
ClassifierDeployment: class probabilities of the stacked-autoencoder classifier.
Replicas answer with (encoded image, provenance): encoding runs beside the forward pass, off the gateway's event
loop, in the format the gateway negotiated (ImageOutput), with the model's provenance in the image's metadata.
"""

import asyncio
import math
import os
import threading
from typing import Any

import numpy as np
from ray import serve

from genray.config import DeploymentOptions, ModelServeConfig, StylePoolConfig
from genray.images import encode_image, make_grid, resize
from genray.model_artifact import provenance
from genray.serving.outputs import ImageOutput

RECENT = 100  # batch sizes kept per replica, for GET /models and the batching test


class _Replica:
    """What every model replica shares: torch threads, the batcher's settings, and a record of batch sizes."""

    def _setup(self, opts: DeploymentOptions, *batched_methods) -> None:
        import torch

        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        for method in batched_methods:  # @serve.batch's decorator values are defaults; the config decides
            method.set_max_batch_size(opts.max_batch_size)
            method.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.num_images = 0  # since the replica started: recent_batch_sizes alone forgets

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """An upload resized to the fixed input of the model (its spec's image_size) and its channels."""
        side = self.spec.image_size(self.model_cfg)
        return resize(image, side, side, channels=self.spec.in_channels(self.model_cfg))

    def _load_artifact(self, cfg: dict[str, Any], name: str, *batched_methods) -> None:
        """For the families the Predictor does not cover: config, threads and batching, then the artefact."""
        from genray.model_artifact import load_artifact
        from genray.inference import default_device

        self.cfg = ModelServeConfig.model_validate(cfg)
        self._setup(self.cfg, *batched_methods)
        self.device = default_device()
        self.spec, self.model_cfg, self.model, self.meta = load_artifact(self.cfg.uri, self.device)
        self.provenance = provenance(name, self.meta)

    def _record_batch(self, size: int) -> None:
        self.batch_sizes = (self.batch_sizes + [size])[-RECENT:]
        self.num_images += size

    def _replica_info(self) -> dict[str, Any]:
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "recent_batch_sizes": self.batch_sizes[-20:], "num_images": self.num_images}

    def info(self) -> dict[str, Any]:
        """The artefact (self.cfg.uri, self.meta) and this replica, for GET /models."""
        return {**_artifact_info(self.cfg.uri, self.meta), **self._replica_info()}


def _artifact_info(uri: str, meta: dict[str, Any]) -> dict[str, Any]:
    from genray.models import get_spec

    return {"uri": uri, "family": meta["family"], "task": get_spec(meta["family"]).task, "digest": meta["digest"],
            "metrics": meta.get("metrics", {})}


def encode(image: np.ndarray, output: ImageOutput, metadata: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """One output image, encoded as the request asked with `metadata` inside: what a replica answers."""
    return encode_image(image, output.format, output.quality, metadata), metadata


def grid(images: np.ndarray, nrow: int | None = None) -> np.ndarray:
    """(N, H, W, C) uint8 -> one grid image, about square unless nrow is given."""
    return make_grid(list(images), nrow=nrow or math.ceil(math.sqrt(len(images))))


class _Request:
    """One request's cancellation flag, shared with the forward thread."""
    cancelled = False


class _Abandoned(Exception):
    """Raised between tile batches of a forward whose requests have all been cancelled."""


class _StopsAbandonedForwards:
    """A large image is many tile batches. Checked between them, a forward whose requests have all been cancelled
    (the gateway's 504 on a timeout, or a client that went away) stops instead of running to the end in its
    thread and holding the replica."""

    def _watch_forwards(self) -> None:
        self._forward_thread = threading.local()  # .requests: those of the batch this thread runs the forward for
        self.num_abandoned = 0  # forwards stopped part-way because every request in them was cancelled

    def _stop_abandoned_forwards(self, predictor) -> None:
        forward = predictor._forward

        def checked_forward(batch):
            requests = getattr(self._forward_thread, "requests", None)
            if requests and all(r.cancelled for r in requests):
                raise _Abandoned()
            return forward(batch)

        predictor._forward = checked_forward

    async def _cancellable(self, batched, *args):
        """Call a @serve.batch method with a cancellation flag of its own as the last argument."""
        request = _Request()
        try:
            return await batched(*args, request)
        except asyncio.CancelledError:
            request.cancelled = True  # read by the forward thread between tile batches
            raise

    def _abandonable(self, requests: list[_Request], run):
        """run() in this (worker) thread, with checked_forward watching `requests`."""
        self._forward_thread.requests = requests
        try:
            return run()
        except _Abandoned:
            self.num_abandoned += 1
            raise RuntimeError("abandoned: every request in this batch was cancelled") from None
        finally:
            self._forward_thread.requests = None


@serve.deployment(max_constructor_retry_count=3)
class ImageDeployment(_StopsAbandonedForwards, _Replica):
    """A model artefact as a batched image -> image function (the Predictor tiles large images)."""

    def __init__(self, cfg: dict[str, Any], name: str):
        from genray.inference import Predictor

        self.cfg = ModelServeConfig.model_validate(cfg)
        self._setup(self.cfg, self._batched)
        self.predictor = Predictor.from_uri(self.cfg.uri, tile=self.cfg.tile, tile_overlap=self.cfg.tile_overlap,
                                            batch_size=self.cfg.max_batch_size)
        self.meta = self.predictor.meta
        self.provenance = provenance(name, self.meta)
        self._watch_forwards()
        self._stop_abandoned_forwards(self.predictor)

    async def __call__(self, image: np.ndarray, output: ImageOutput) -> tuple[bytes, dict[str, str]]:
        return await self._cancellable(self._batched, image, output)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, images: list[np.ndarray], outputs: list[ImageOutput],
                       requests: list[_Request]) -> list[tuple[bytes, dict[str, str]]]:
        self._record_batch(len(images))
        # In a thread: the replica's event loop keeps accepting (and batching) requests during the forward pass.
        return await asyncio.to_thread(self._abandonable, requests, lambda: [
            encode(y, o, self.provenance) for y, o in zip(self.predictor(images), outputs)])

    def info(self) -> dict[str, Any]:
        return {**super().info(), "num_abandoned_forwards": self.num_abandoned}


class _LoadedStyle:
    """One style network loaded on a replica. Serve's multiplexer calls __del__ when it evicts the style."""

    def __init__(self, name: str, predictor, registry: dict[str, "_LoadedStyle"]):
        self.name, self.predictor, self.registry = name, predictor, registry
        registry[name] = self

    def __del__(self):
        if self.registry.get(self.name) is self:  # may also run later from the garbage collector: only once
            del self.registry[self.name]


@serve.deployment(max_constructor_retry_count=3)
class StylePoolDeployment(_StopsAbandonedForwards, _Replica):
    """Fast style networks behind one deployment: the request's multiplexed model id names the style, and any
    replica loads it on first use (least recently used styles are evicted beyond max_styles_per_replica)."""

    def __init__(self, cfg: dict[str, Any]):
        from genray.model_artifact import read_meta
        from genray.models import get_spec

        self.cfg = StylePoolConfig.model_validate(cfg)
        self._setup(self.cfg, self._batched)
        # model.json of every style up front (small files): a wrong URI fails the deployment, not a request,
        # and GET /models lists every style's digest, loaded or not.
        self.metas = {name: read_meta(uri) for name, uri in self.cfg.uris.items()}
        wrong = {name: m["family"] for name, m in self.metas.items() if get_spec(m["family"]).task != "style"}
        if wrong:
            raise ValueError(f"not style networks: {wrong}")
        self.loaded: dict[str, _LoadedStyle] = {}
        self.num_loads = 0
        self._watch_forwards()

        async def load_style(style: str) -> _LoadedStyle:
            return await asyncio.to_thread(self._load, style)

        # Wrapped here rather than decorated on the class, so the cache size comes from the config.
        self.get_style = serve.multiplexed(max_num_models_per_replica=self.cfg.max_styles_per_replica)(load_style)

    def _load(self, style: str) -> _LoadedStyle:
        from genray.inference import Predictor

        predictor = Predictor.from_uri(self.cfg.uris[style], tile=self.cfg.tile, tile_overlap=self.cfg.tile_overlap,
                                       batch_size=self.cfg.max_batch_size)
        self._stop_abandoned_forwards(predictor)
        self.num_loads += 1
        return _LoadedStyle(style, predictor, self.loaded)

    async def __call__(self, image: np.ndarray, output: ImageOutput) -> tuple[bytes, dict[str, str]]:
        return await self._cancellable(self._batched, image, output)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, images: list[np.ndarray], outputs: list[ImageOutput],
                       requests: list[_Request]) -> list[tuple[bytes, dict[str, str]]]:
        # Serve splits batches by multiplexed model id (captured from each request), so one batch is one style.
        name = serve.get_multiplexed_model_id()
        style = await self.get_style(name)
        self._record_batch(len(images))
        metadata = provenance(name, self.metas[name])
        return await asyncio.to_thread(self._abandonable, requests, lambda: [
            encode(y, o, metadata) for y, o in zip(style.predictor(images), outputs)])

    def info(self) -> dict[str, Any]:
        return {"styles": {name: _artifact_info(self.cfg.uris[name], meta) for name, meta in self.metas.items()},
                "loaded_on_replica": sorted(self.loaded), "num_loads": self.num_loads,
                "max_styles_per_replica": self.cfg.max_styles_per_replica, "num_abandoned_forwards": self.num_abandoned,
                **self._replica_info()}


@serve.deployment(max_constructor_retry_count=3)
class GeneratorDeployment(_Replica):
    """DCGAN or VAE: seeded samples as a PNG grid; a VAE also reconstructs uploads (batched) and interpolates."""

    def __init__(self, cfg: dict[str, Any], name: str):
        self._load_artifact(cfg, name, self.reconstruct)
        if self.spec.generate is None:
            raise ValueError(f"{self.cfg.uri}: family {self.spec.name} does not generate images")

    async def generate(self, n: int, seed: int, output: ImageOutput) -> tuple[bytes, dict[str, str]]:
        # Not batched across requests: each request's noise comes from its own seeded generator, which is what
        # makes "same seed, same image" hold; n images already share one forward pass.
        return await asyncio.to_thread(lambda: self._seeded(
            grid(self.spec.generate(self.model, n, seed, self.model_cfg)), output, seed))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def reconstruct(self, images: list[np.ndarray],
                          outputs: list[ImageOutput]) -> list[tuple[bytes, dict[str, str]]]:
        self._require(self.spec.reconstruct, "reconstruct")
        self._record_batch(len(images))

        def run() -> list[tuple[bytes, dict[str, str]]]:
            fitted = [self._fit(im) for im in images]
            return [encode(y, o, self.provenance)
                    for y, o in zip(self.spec.reconstruct(self.model, fitted, self.model_cfg), outputs)]

        return await asyncio.to_thread(run)

    async def interpolate(self, steps: int, seed: int, output: ImageOutput) -> tuple[bytes, dict[str, str]]:
        self._require(self.spec.interpolate, "interpolate")
        return await asyncio.to_thread(lambda: self._seeded(
            grid(self.spec.interpolate(self.model, steps, seed, self.model_cfg), nrow=steps), output, seed))

    def _seeded(self, image: np.ndarray, output: ImageOutput, seed: int) -> tuple[bytes, dict[str, str]]:
        """A sampled image, its seed written beside the provenance: the file alone is enough to draw it again."""
        data, _ = encode(image, output, {**self.provenance, "genray:seed": str(seed)})
        return data, self.provenance  # the gateway sends the seed as X-Seed already

    def _require(self, hook, what: str) -> None:
        if hook is None:  # the gateway routes here only models that can; this guards direct handle calls
            raise ValueError(f"a {self.spec.name} model cannot {what}")


@serve.deployment(max_constructor_retry_count=3)
class ClassifierDeployment(_Replica):
    """The stacked-autoencoder classifier: an upload (resized to the model's input) -> class probabilities."""

    def __init__(self, cfg: dict[str, Any], name: str):
        self._load_artifact(cfg, name, self.__call__)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def __call__(self, images: list[np.ndarray]) -> list[tuple[dict[str, Any], dict[str, str]]]:
        self._record_batch(len(images))
        return [(answer, self.provenance) for answer in await asyncio.to_thread(self._classify, images)]

    def _classify(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        from genray.images import to_float

        x = to_float(np.stack([self._fit(im) for im in images]), self.spec.value_range)
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.from_numpy(x).to(self.device)), dim=1).cpu().numpy()  # (B, K)
        return [{"label": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]
