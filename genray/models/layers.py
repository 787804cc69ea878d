"""Layers shared by more than one family."""
from __future__ import annotations

from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (DDP keeps it in .module), or the module itself."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def dense_stack(sizes: list[int]) -> list[nn.Module]:
    """Linear layers through `sizes` with ReLU between them (none after the last: callers choose its activation)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers
