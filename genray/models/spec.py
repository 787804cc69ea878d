"""What a model family hands to the rest of genray: its config class and the functions the loop calls.

The training loop, the Predictor, the CLI and the test battery only ever see a ModelSpec, so adding a family is
one file plus one line in genray/models/__init__.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

Task = Literal["denoise", "superres", "style", "generate", "classify", "reconstruct"]
ValueRange = Literal["tanh", "sigmoid"]  # [-1, 1] or [0, 1] inside the model


@dataclass
class TrainState:
    """Everything one worker trains: modules (each wrapped in DDP separately by the loop) and their optimizers.

    `modules["model"]` is always the network saved in the artefact and used for inference.
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    cfg: Any  # the family's config object
    step: int = 0

    @property
    def model(self) -> nn.Module:
        return self.modules["model"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type  # pydantic model with family: Literal[name] and a tiny() classmethod
    task: Task
    value_range: ValueRange
    build: Callable[[Any], nn.Module]  # cfg -> the inference network
    init_training: Callable[[Any, float], TrainState]  # (cfg, lr) -> modules + optimizers
    train_step: Callable[[TrainState, torch.Tensor], dict[str, float]]  # (state, batch NCHW) -> losses
    # (state or model, fixed float batch NCHW, cfg) -> uint8 HWC grid for samples/epoch_NNN.png
    sample_grid: Callable[[nn.Module, torch.Tensor, Any], np.ndarray]
    # (model, held-out uint8 NHWC images, cfg) -> quality metrics for model.json
    evaluate: Callable[[nn.Module, np.ndarray, Any], dict[str, float]]
    in_channels: Callable[[Any], int]
    scale: int = 1  # output size / input size (4 for x4 super-resolution)
    size_multiple: int = 1  # inputs are padded to a multiple of this before the forward pass
