"""What the gateway answers with: the output image format, chosen by `?format=` or else the `Accept` header (PNG
unless the client prefers JPEG or WebP; 406 when it accepts none of them), and the provenance headers.

Kept apart from gateway.py so the negotiation is readable (and testable) on its own; encoding itself happens in
the model replicas (genray.images.encode_image), beside the forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastapi import HTTPException, Query

from genray.images import DEFAULT_QUALITY, OUTPUT_FORMATS

ALIASES = {"jpg": "jpeg"}
# Equal q-values are broken in this order: lossless PNG first (what genray answered before formats existed).
PREFERENCE = ("png", "webp", "jpeg")
# For OpenAPI: every image route may answer any of these.
IMAGE_RESPONSES = {200: {"content": {media: {} for media in OUTPUT_FORMATS.values()},
                         "description": "the image, as PNG unless `format` or `Accept` asks for JPEG or WebP"},
                   406: {"description": "`Accept` names none of image/png, image/jpeg, image/webp"}}


@dataclass(frozen=True)
class ImageOutput:
    """The encoding a request asked for; handed to the model replica, which encodes its output with it."""

    format: str = "png"
    quality: int = DEFAULT_QUALITY

    @property
    def media_type(self) -> str:
        return OUTPUT_FORMATS[self.format]


class OutputQuery:
    """FastAPI dependency: the `format` and `quality` query parameters of the image routes (a bad value is 400)."""

    def __init__(self, format: Literal["png", "jpeg", "jpg", "webp"] | None = Query(
                     None, description="output format; overrides the Accept header"),
                 quality: int | None = Query(None, ge=1, le=100, description=f"JPEG / WebP quality "
                                                                             f"(default {DEFAULT_QUALITY})")):
        self.format, self.quality = format, quality

    def resolve(self, accept: str | None) -> ImageOutput:
        fmt = ALIASES.get(self.format, self.format) if self.format else negotiate(accept)
        return ImageOutput(fmt, DEFAULT_QUALITY if self.quality is None else self.quality)


def negotiate(accept: str | None) -> str:
    """The output format for an Accept header (RFC 9110 12.5.1): each format takes the q-value of the most specific
    range that matches it (`image/webp` over `image/*` over `*/*`); the highest q wins, ties go by PREFERENCE, so a
    browser's `image/webp,...,*/*;q=0.8` or a bare `*/*` gets PNG. No header: PNG. Nothing acceptable: 406."""
    if not accept or not accept.strip():
        return "png"
    ranges: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0  # a malformed q is no preference for the range, not an error
        media = media.lower()
        ranges[media] = max(q, ranges.get(media, 0.0))  # a range given twice: its kinder q
    scores = {}
    for fmt in PREFERENCE:
        media = OUTPUT_FORMATS[fmt]
        for candidate in (media, media.split("/")[0] + "/*", "*/*"):
            if candidate in ranges:
                scores[fmt] = ranges[candidate]
                break
    best = max(scores.values(), default=0.0)
    if best <= 0.0:
        raise HTTPException(406, f"cannot answer {accept!r}: this route answers image/png, image/jpeg or image/webp "
                                 "(or ask with ?format=png|jpeg|webp)")
    return next(fmt for fmt in PREFERENCE if scores.get(fmt) == best)


def provenance_headers(provenance: dict[str, str]) -> dict[str, str]:
    """{"genray:model-digest": v, ...} (genray.model_artifact.provenance) -> {"X-Genray-Model-Digest": v, ...}."""
    return {"X-" + "-".join(w.capitalize() for w in key.replace(":", "-").split("-")): value
            for key, value in provenance.items()}
