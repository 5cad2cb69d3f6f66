"""Models small enough for DP-SGD on a CPU.

GroupNorm, not BatchNorm: BatchNorm mixes samples inside a batch, so per-sample
gradients (and with them DP-SGD's clipping) are undefined; Opacus rejects it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedguard.core.config import ModelSpec
from fedguard.core.datasets import FeatureSchema
from fedguard.core.errors import ConfigError


class TabularMLP(nn.Module):
    """A ReLU multilayer perceptron for tabular features."""

    def __init__(self, num_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(start_dim=1))  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with GroupNorm, for 8x8 (digits) or larger images."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"SmallCNN needs a (channels, height, width) input, got {input_shape}"
            )
        channels, height, width_px = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=3, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (height // 2) * (width_px // 2)
        self.classifier = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(start_dim=1))  # type: ignore[no-any-return]


def build_model(schema: FeatureSchema, spec: ModelSpec) -> nn.Module:
    """The model for a data set: a CNN for images, an MLP for tables."""
    if len(schema.input_shape) == 3:
        return SmallCNN(schema.input_shape, schema.num_classes)
    return TabularMLP(math.prod(schema.input_shape), spec.hidden, schema.num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
