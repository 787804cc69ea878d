"""The task table: what genray does with the models of each task. Pure data (no torch), so configs and the CLI
can read it; every model family names one task in its ModelSpec."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["denoise", "superres", "style", "generate", "classify", "reconstruct"]


@dataclass(frozen=True)
class TaskInfo:
    """What genray does with the models of one task."""

    image_to_image: bool  # forward maps an image batch (B, C, H, W) to images: the Predictor runs it, tiles and all
    bulk: bool  # `genray process <task>` runs it over image prefixes and archives
    route: Literal["image", "generator", "classifier"]  # the kind of Serve deployment and routes it gets
    evaluated: bool  # `genray eval --task <task>` measures it against classical baselines


# The one task table: CLI choices, config validation, genray eval, Serve routes and the tests all read it.
TASKS: dict[str, TaskInfo] = {
    "denoise": TaskInfo(image_to_image=True, bulk=True, route="image", evaluated=True),
    "superres": TaskInfo(image_to_image=True, bulk=True, route="image", evaluated=True),
    "style": TaskInfo(image_to_image=True, bulk=True, route="image", evaluated=False),
    "reconstruct": TaskInfo(image_to_image=True, bulk=False, route="image", evaluated=True),
    "generate": TaskInfo(image_to_image=False, bulk=False, route="generator", evaluated=True),
    "classify": TaskInfo(image_to_image=False, bulk=False, route="classifier", evaluated=True),
}
assert set(TASKS) == set(Task.__args__), "TASKS and Task must name the same tasks"
BULK_TASKS = tuple(name for name, info in TASKS.items() if info.bulk)
EVAL_TASKS = tuple(name for name, info in TASKS.items() if info.evaluated)
