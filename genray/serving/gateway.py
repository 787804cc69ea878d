"""The FastAPI ingress of the Serve app: checks the bearer token, validates and decodes uploads (raw bodies or
multipart forms; 400 bad image, 413 too large), picks the output format (?format= or Accept; 406), calls the model
deployments with a timeout (504), turns full queues into 503/429, and counts and times every request per route as
Ray Serve custom metrics. Image answers carry the model's provenance as X-Genray-* headers (and in the image).

Routes: POST /<model> (image models), POST /style/<style> (multiplexed), GET /generate/<model>,
POST /vae/<model>/reconstruct, GET /vae/<model>/interpolate, POST /classify/<model>, GET /models, /docs.
GET /-/healthz is answered by Serve's proxy itself, so it stays open and never reaches this code.
"""

import asyncio
import math
import secrets
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from genray import __version__
from genray.config import ServeAppConfig
from genray.images import ImageError, ImageTooLargeError, decode_image
from genray.serving.auth import BearerAuth, load_token, open_access_error
from genray.serving.metrics import RouteMetricsMiddleware, label_model
from genray.serving.outputs import IMAGE_RESPONSES, ImageOutput, OutputQuery, provenance_headers
from genray.serving.page import PAGE
from genray.serving.uploads import IMAGE_FIELD, UploadError, body_reader

# Declared for OpenAPI (an "Authorize" button in /docs); the check itself is Gateway._authorize.
_bearer = HTTPBearer(auto_error=False, description="needed when the server has a token configured")
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": [IMAGE_FIELD], "properties": {
        IMAGE_FIELD: {"type": "string", "format": "binary"}}}}}}}
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes seeds below this

api = FastAPI(title="genray", version=__version__, dependencies=[Security(_bearer)],
              description="Generative image models served with Ray Serve: image in as the request body "
                          f"(PNG/JPEG/...) or as the `{IMAGE_FIELD}` field of a multipart form; PNG out, or JPEG / "
                          "WebP by `?format=` or `Accept`.")
api.add_middleware(RouteMetricsMiddleware)


@api.exception_handler(RequestValidationError)
async def _invalid_parameters(request: Request, err: RequestValidationError) -> JSONResponse:
    """A malformed query parameter is a bad request like any other: 400 with the reason, not FastAPI's 422."""
    reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return JSONResponse({"detail": reasons}, status_code=400)


def _proxy_host() -> str | None:
    """The host Serve's HTTP proxies listen on, asked of the Serve controller; None if it cannot be told."""
    import ray

    if not ray.is_initialized():  # the class used outside Serve (tests): asking would start a Ray
        return None
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - no controller reachable: `genray serve` has checked the host already
        return None


def _image(result: tuple[bytes, dict[str, str]], output: ImageOutput, **headers: str) -> Response:
    """A replica's (encoded image, provenance) as the response; `Vary: Accept` since the format may follow it."""
    data, provenance = result
    return Response(data, media_type=output.media_type,
                    headers={**provenance_headers(provenance), "Vary": "Accept", **headers})


@serve.deployment(max_constructor_retry_count=3)  # a bad token setup fails the deploy fast, not after 20 tries
@serve.ingress(api)
class Gateway:
    def __init__(self, cfg: dict[str, Any], routes: dict[str, dict[str, Any]],
                 models: dict[str, DeploymentHandle], styles: DeploymentHandle | None):
        """routes: model name -> {"kind": image|generator|classifier, "family", "task", "scale"} (from build_app)."""
        self.cfg = ServeAppConfig.model_validate(cfg)
        self.routes, self.models, self.styles = routes, models, styles
        token = load_token(self.cfg.token_file)  # a blank token source raises TokenError: it is never "no token"
        if token is None and self.cfg.require_token:
            raise RuntimeError("require_token is set but no bearer token was found ($GENRAY_SERVE_TOKEN, "
                               "$GENRAY_SERVE_TOKEN_FILE or token_file)")
        # Checked here as well as in `genray serve`, so `serve run` / `serve deploy` of the same config refuse too.
        refusal = open_access_error(_proxy_host(), token, self.cfg.insecure)
        if refusal:
            raise RuntimeError(refusal)
        self.auth = BearerAuth(token)

    # -- the checks every route makes ---------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.auth.allows(request.headers.get("authorization")):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _output(self, request: Request, query: OutputQuery) -> ImageOutput:
        """The output encoding: ?format= / ?quality=, else what the Accept header prefers (406 if nothing fits)."""
        return query.resolve(request.headers.get("accept"))

    def _model(self, request: Request, name: str, kind: str, reconstructs: bool = False) -> DeploymentHandle:
        """The deployment serving `name` as a `kind` model (with `reconstructs`: one that can encode and decode,
        i.e. a VAE); a 404 listing the names that would fit otherwise."""
        def fits(route: dict | None) -> bool:
            return route is not None and route["kind"] == kind and (route["reconstructs"] or not reconstructs)

        if not fits(self.routes.get(name)):
            served = sorted(n for n, r in self.routes.items() if fits(r))
            what = "vae model" if reconstructs else f"{kind} model"
            raise HTTPException(404, f"no {what} {name!r}; served: {', '.join(served) or 'none'}")
        label_model(request.scope, name)
        return self.models[name]

    async def _read_body(self, request: Request) -> bytes:
        """The uploaded image's bytes (the raw body, or a multipart form's image part), within max_body_bytes (413)
        and body_read_timeout_s (408), both counted on the whole body as it arrives, before anything is decoded.
        Held once: the chunks are joined into one bytes object (which decode_image reads in place) and dropped."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes is over the {limit}-byte limit (max_body_bytes)")
        size = 0
        try:
            reader = body_reader(request.headers.get("content-type"))
            async with asyncio.timeout(self.cfg.body_read_timeout_s):
                async for chunk in request.stream():  # counted as it arrives: a lying Content-Length cannot pass
                    size += len(chunk)
                    if size > limit:
                        raise HTTPException(413, f"body is over the {limit}-byte limit (max_body_bytes)")
                    reader.write(chunk)
            return reader.result()
        except UploadError as err:
            raise HTTPException(400, f"bad upload: {err}") from None
        except TimeoutError:
            raise HTTPException(408, f"upload not received within {self.cfg.body_read_timeout_s:g} s "
                                     f"(body_read_timeout_s); {size:,} bytes arrived",
                                headers={"Connection": "close"}) from None

    async def _read_image(self, request: Request) -> np.ndarray:
        body = await self._read_body(request)
        try:
            # Off the event loop: a large image takes a while to decode, and other requests keep flowing.
            # decode_image applies the same limits as bulk jobs (format allowlist, pixel and memory bounds).
            return await asyncio.to_thread(decode_image, body, None, self.cfg.max_pixels)
        except ImageTooLargeError as err:
            raise HTTPException(413, str(err)) from None
        except ImageError as err:
            raise HTTPException(400, f"bad image: {err}") from None

    def _count(self, value: int, name: str, minimum: int) -> int:
        if not minimum <= value <= self.cfg.max_images:
            raise HTTPException(400, f"{name} must be between {minimum} and {self.cfg.max_images}, got {value}")
        return value

    async def _answer(self, response: DeploymentResponse) -> Any:
        """Await a model deployment's answer: 504 past the timeout, 503/429 when its bounded queue is full."""
        try:
            return await asyncio.wait_for(response, self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise HTTPException(504, f"no answer from the model within {self.cfg.request_timeout_s:g} s") from None
        except BackPressureError as err:
            headers = {"Retry-After": str(math.ceil(err.retry_after_s))} if err.retry_after_s is not None else None
            raise HTTPException(err.status_code, f"overloaded, try again later ({err.message})", headers) from None
        except DeploymentUnavailableError as err:
            raise HTTPException(503, f"model unavailable: {err.message}") from None

    # -- routes -------------------------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The upload page (genray/serving/page.py). Static and secret-free, so it needs no token; the routes
        it calls check the token as for any client."""
        return HTMLResponse(PAGE)

    @api.get("/models")
    async def list_models(self, request: Request) -> JSONResponse:
        """What is served: each model's artefact (URI, family, digest, metrics) and its routes; the style pool."""
        self._authorize(request)
        names = list(self.models)
        infos = await asyncio.gather(*(self._answer(self.models[n].info.remote()) for n in names))
        models = {n: {**info, "kind": self.routes[n]["kind"]} for n, info in zip(names, infos)}
        styles = await self._answer(self.styles.info.remote()) if self.styles else None
        return JSONResponse({"models": models, "styles": styles})

    @api.post("/style/{style}", response_class=Response, responses=IMAGE_RESPONSES, openapi_extra=_IMAGE_BODY)
    async def stylize(self, style: str, request: Request, query: OutputQuery = Depends()) -> Response:
        """A fast style network, picked by name from the multiplexed style pool."""
        self._authorize(request)
        known = self.cfg.styles.uris if self.cfg.styles else {}
        if style not in known:
            raise HTTPException(404, f"no style {style!r}; served: {', '.join(sorted(known)) or 'none'}")
        label_model(request.scope, style)
        output = self._output(request, query)
        image = await self._read_image(request)
        self._check_output_size(image, 1)
        return _image(await self._answer(self.styles.options(multiplexed_model_id=style).remote(image, output)),
                      output)

    @api.get("/generate/{model}", response_class=Response, responses=IMAGE_RESPONSES)
    async def generate(self, model: str, request: Request, n: int = 16,
                       seed: int | None = Query(None, ge=0, lt=SEED_LIMIT), query: OutputQuery = Depends()) -> Response:
        """n samples of a DCGAN or VAE as a grid; the same seed gives the same image (X-Seed says which)."""
        self._authorize(request)
        handle, n = self._model(request, model, "generator"), self._count(n, "n", 1)
        output = self._output(request, query)
        seed = secrets.randbelow(2**31) if seed is None else seed
        grid = await self._answer(handle.generate.remote(n, seed, output))
        return _image(grid, output, **{"X-Seed": str(seed)})

    @api.post("/vae/{model}/reconstruct", response_class=Response, responses=IMAGE_RESPONSES, openapi_extra=_IMAGE_BODY)
    async def vae_reconstruct(self, model: str, request: Request, query: OutputQuery = Depends()) -> Response:
        """The VAE's reconstruction decode(mu) of the upload, resized to the VAE's image size and channels."""
        self._authorize(request)
        handle = self._model(request, model, "generator", reconstructs=True)
        output = self._output(request, query)
        image = await self._read_image(request)
        return _image(await self._answer(handle.reconstruct.remote(image, output)), output)

    @api.get("/vae/{model}/interpolate", response_class=Response, responses=IMAGE_RESPONSES)
    async def vae_interpolate(self, model: str, request: Request, steps: int = 8,
                              seed: int | None = Query(None, ge=0, lt=SEED_LIMIT),
                              query: OutputQuery = Depends()) -> Response:
        """Decodings along the line between two latents drawn with `seed`, as one row of `steps` images."""
        self._authorize(request)
        handle, steps = self._model(request, model, "generator", reconstructs=True), self._count(steps, "steps", 2)
        output = self._output(request, query)
        seed = secrets.randbelow(2**31) if seed is None else seed
        strip = await self._answer(handle.interpolate.remote(steps, seed, output))
        return _image(strip, output, **{"X-Seed": str(seed)})

    @api.post("/classify/{model}", openapi_extra=_IMAGE_BODY)
    async def classify(self, model: str, request: Request) -> JSONResponse:
        """Class probabilities for the upload: {"label": k, "probabilities": [...]}."""
        self._authorize(request)
        handle = self._model(request, model, "classifier")
        image = await self._read_image(request)
        probabilities, provenance = await self._answer(handle.remote(image))
        return JSONResponse(probabilities, headers=provenance_headers(provenance))

    # Declared last: a single path segment that none of the routes above claimed names an image model.
    @api.post("/{name}", response_class=Response, responses=IMAGE_RESPONSES, openapi_extra=_IMAGE_BODY)
    async def process(self, name: str, request: Request, query: OutputQuery = Depends()) -> Response:
        """Image models (denoise, superres, ...): an image in (raw body or multipart `image` field), the model's
        output back as PNG, JPEG or WebP; large images are tiled."""
        self._authorize(request)
        handle = self._model(request, name, "image")
        output = self._output(request, query)
        image = await self._read_image(request)
        self._check_output_size(image, self.routes[name]["scale"])
        return _image(await self._answer(handle.remote(image, output)), output)

    def _check_output_size(self, image: np.ndarray, scale: int) -> None:
        height, width = image.shape[0] * scale, image.shape[1] * scale
        if height * width > self.cfg.max_output_pixels:
            raise HTTPException(413, f"the output would be {width}x{height} = {width * height:,} pixels, "
                                     f"limit {self.cfg.max_output_pixels:,}")
