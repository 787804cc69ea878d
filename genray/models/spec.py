"""What a model family hands to the rest of genray: its config class and the functions the loop calls.

The training loop, the Predictor, the CLI and the test battery only ever see a ModelSpec, so adding a family is
one file plus one line in genray/models/__init__.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from genray.tasks import TASKS, Task

ValueRange = Literal["tanh", "sigmoid"]  # [-1, 1] or [0, 1] inside the model


@dataclass
class TrainState:
    """Everything one worker trains: modules (each wrapped in DDP separately by the loop) and their optimizers.

    `modules["model"]` is always the network saved in the artefact and used for inference.
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    cfg: Any  # the family's config object
    step: int = 0  # optimizer steps so far (carried over on resume)
    epoch: int = 0  # the epoch being trained, 1-based (set by the loop; phases such as SRGAN's pretraining use it)
    # Helpers that are not trained and not checkpointed (e.g. a frozen VGG for perceptual losses); the family
    # moves them to the batch's device itself.
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.modules["model"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type  # pydantic model with family: Literal[name], extra="forbid", frozen, and a tiny() classmethod
    task: Task
    value_range: ValueRange
    build: Callable[[Any], nn.Module]  # cfg -> the network saved in the artefact and used for inference
    init_training: Callable[[Any, float], TrainState]  # (cfg, lr) -> modules + optimizers
    # (state, batch) -> losses. The batch is what the family's dataset yields, collated and on the device.
    train_step: Callable[[TrainState, Any], dict[str, float]]
    # (unwrapped modules, a fixed collated batch, cfg) -> uint8 HWC grid for samples/epoch_NNN.png
    sample_grid: Callable[[dict[str, nn.Module], Any, Any], np.ndarray]
    # (model, held-out uint8 HWC images, their labels or None, cfg) -> quality metrics for model.json
    evaluate: Callable[[nn.Module, list[np.ndarray], list[int] | None, Any], dict[str, float]]
    in_channels: Callable[[Any], int]
    # (uint8 HWC images, labels or None, cfg) -> a torch Dataset for training. None: the images as one float
    # tensor each, in value_range (they must share one size); see genray.models.data.
    make_dataset: Callable[[list[np.ndarray], list[int] | None, Any], torch.utils.data.Dataset] | None = None
    # (model, n, seed, cfg) -> n generated uint8 HWC images stacked (N, H, W, C), for generative families
    generate: Callable[[nn.Module, int, int, Any], np.ndarray] | None = None
    # (model, held-out images, labels, cfg) -> extra files for the run's output, e.g. {"embedding.png": b"..."}
    extra_outputs: Callable[[nn.Module, list[np.ndarray], list[int] | None, Any], dict[str, bytes]] | None = None
    # What evaluation and serving ask of a family, so that no caller needs to know families by name:
    # (cfg) -> the Gaussian noise sigma (0..255 units) a denoiser was trained for
    noise_sigma: Callable[[Any], float] | None = None
    # (cfg) -> the one input side of a fixed-size model (and the side a generator makes); None: any size
    image_size: Callable[[Any], int] | None = None
    # (cfg) -> the size of the model's code, e.g. the PCA baseline's number of components
    code_size: Callable[[Any], int] | None = None
    # (model, uint8 HWC images of image_size, cfg) -> their reconstructions (N, H, W, C), for models that encode
    # and decode (a VAE); the Serve route /vae/<model>/reconstruct and genray eval's reconstruct task use it
    reconstruct: Callable[[nn.Module, list[np.ndarray], Any], np.ndarray] | None = None
    # (model, steps, seed, cfg) -> a latent-space walk (steps, H, W, C)
    interpolate: Callable[[nn.Module, int, int, Any], np.ndarray] | None = None
    scale: int = 1  # output size / input size (4 for x4 super-resolution)
    size_multiple: int = 1  # inputs are padded to a multiple of this before the forward pass
    # The smallest input side the network takes as it is (it pads smaller inputs itself, in Python code that an
    # exported graph cannot keep): `genray export` promises its files for sides of at least this.
    min_side: int = 1
    loss_decreases: bool = True  # False for adversarial losses, which need not fall (the test battery reads it)

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        """The `genray eval` tasks this family can be measured on: its own, and reconstruction if it reconstructs."""
        tasks = [self.task] + (["reconstruct"] if self.reconstruct is not None else [])
        return tuple(t for t in dict.fromkeys(tasks) if TASKS[t].evaluated)
