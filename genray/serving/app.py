"""The genray Serve application, built from a typed config (`build_app`).

One deployment per model artefact, each wrapping the shared Predictor with @serve.batch, behind a FastAPI
ingress that validates uploads (400 bad image, 413 too large) before they reach a model replica.
"""

import asyncio
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from genray.config import ModelServeConfig, ServeAppConfig
from genray.images import ImageError, ImageTooLargeError, decode_image, encode_png

IMAGE_TASKS = ("denoise", "superres", "style")


@serve.deployment(max_ongoing_requests=32)
class ImageModel:
    """A model artefact as a batched image -> image function."""

    def __init__(self, cfg: dict[str, Any]):
        from genray.inference import Predictor

        self.cfg = ModelServeConfig.model_validate(cfg)
        self.predictor = Predictor.from_uri(self.cfg.uri, tile=self.cfg.tile, tile_overlap=self.cfg.tile_overlap,
                                            batch_size=self.cfg.max_batch_size)
        self.batch_sizes: list[int] = []  # recent batch sizes, for /models and the batching test
        self.predict.set_max_batch_size(self.cfg.max_batch_size)
        self.predict.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes = (self.batch_sizes + [len(images)])[-100:]
        # The forward pass runs in a thread so the replica's event loop keeps accepting requests meanwhile.
        return await asyncio.to_thread(self.predictor, images)

    async def __call__(self, image: np.ndarray) -> np.ndarray:
        return await self.predict(image)

    def info(self) -> dict[str, Any]:
        meta = self.predictor.meta
        return {"uri": self.cfg.uri, "family": meta["family"], "task": meta["task"], "digest": meta["digest"],
                "metrics": meta.get("metrics", {}), "recent_batch_sizes": self.batch_sizes[-20:]}


api = FastAPI(title="genray", description="Generative image models served with Ray Serve")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class Gateway:
    def __init__(self, cfg: dict[str, Any], models: dict[str, DeploymentHandle]):
        self.cfg = ServeAppConfig.model_validate(cfg)
        self.models = models

    async def _read_image(self, request: Request) -> np.ndarray:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise HTTPException(413, f"body of {declared} bytes is over the {self.cfg.max_body_bytes}-byte limit")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives, so a lying Content-Length cannot get past
            body += chunk
            if len(body) > self.cfg.max_body_bytes:
                raise HTTPException(413, f"body is over the {self.cfg.max_body_bytes}-byte limit")
        try:
            return decode_image(bytes(body), channels=None, max_pixels=self.cfg.max_pixels)
        except ImageTooLargeError as err:
            raise HTTPException(413, str(err)) from None
        except ImageError as err:
            raise HTTPException(400, f"bad image: {err}") from None

    @api.get("/models")
    async def list_models(self) -> JSONResponse:
        infos = await asyncio.gather(*(h.info.remote() for h in self.models.values()))
        return JSONResponse(dict(zip(self.models, infos)))

    @api.post("/{name}", responses={200: {"content": {"image/png": {}}}})
    async def process(self, name: str, request: Request) -> Response:
        """Image bytes (PNG/JPEG/...) in, PNG out."""
        if name not in self.models:
            raise HTTPException(404, f"no model {name!r}; served: {', '.join(sorted(self.models))}")
        image = await self._read_image(request)
        output = await self.models[name].remote(image)
        return Response(encode_png(output), media_type="image/png")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Typed app builder: `serve run` and `genray serve` both call this with the config's `args`."""
    cfg = ServeAppConfig.model_validate(args)
    models = {
        name: ImageModel.options(name=f"model-{name}", num_replicas=m.num_replicas,
                                 ray_actor_options={"num_cpus": m.num_cpus},
                                 max_ongoing_requests=max(32, 2 * m.max_batch_size)).bind(m.model_dump(mode="json"))
        for name, m in cfg.models.items()
    }
    return Gateway.options(ray_actor_options={"num_cpus": 0.1}).bind(cfg.model_dump(mode="json"), models)
