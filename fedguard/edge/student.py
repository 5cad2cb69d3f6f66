"""The edge student's architecture: an MLP for tables, a small CNN for images.

No normalization layers: the student is trained with DP-SGD in federated
distillation (per-sample gradients) and quantized to int8 afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from fedguard.core.datasets import FeatureSchema
from fedguard.core.errors import ConfigError

__all__ = ["StudentCNN", "StudentKind", "StudentSpec"]


class StudentKind(StrEnum):
    AUTO = "auto"  # a CNN for image data sets, an MLP for tables
    MLP = "mlp"
    CNN = "cnn"


class StudentCNN(nn.Module):
    """One 3x3 convolution, ReLU, 2x2 max-pool and a linear classifier (no norm layer).

    No BatchNorm (DP-SGD needs per-sample gradients) and no GroupNorm either: at
    this size it is not needed, and it would stay float after quantization.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 8):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"StudentCNN needs a (channels, height, width) input, got {input_shape}"
            )
        in_channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(channels * (height // 2) * (width // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(start_dim=1))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class StudentSpec:
    """The student's architecture. Defaults are edge-sized: MLP (16,), CNN with 8 channels."""

    kind: StudentKind = StudentKind.AUTO
    hidden: tuple[int, ...] = (16,)
    channels: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StudentKind):
            raise ConfigError(f"student kind must be a StudentKind, got {self.kind!r}")
        if not self.hidden or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden
        ):
            raise ConfigError(f"student hidden sizes must be integers >= 1, got {self.hidden!r}")
        if (
            isinstance(self.channels, bool)
            or not isinstance(self.channels, int)
            or self.channels < 1
        ):
            raise ConfigError(f"student channels must be an integer >= 1, got {self.channels!r}")

    def resolve(self, schema: FeatureSchema) -> StudentKind:
        if self.kind is StudentKind.AUTO:
            return StudentKind.CNN if len(schema.input_shape) == 3 else StudentKind.MLP
        if self.kind is StudentKind.CNN and len(schema.input_shape) != 3:
            raise ConfigError(f"a CNN student needs image data; {schema.dataset} is tabular")
        return self.kind

    def build(self, schema: FeatureSchema) -> nn.Module:
        from fedguard.core.models import TabularMLP

        if self.resolve(schema) is StudentKind.CNN:
            return StudentCNN(schema.input_shape, schema.num_classes, self.channels)
        return TabularMLP(math.prod(schema.input_shape), self.hidden, schema.num_classes)

    def describe(self, schema: FeatureSchema) -> str:
        if self.resolve(schema) is StudentKind.CNN:
            return f"CNN: conv3x3({self.channels}) + ReLU + maxpool2 + linear"
        sizes = [math.prod(schema.input_shape), *self.hidden, schema.num_classes]
        return "MLP " + "-".join(str(s) for s in sizes)
