"""Model factories a consortium might write (``--model-factory tests.core.user_models:...``)."""

from __future__ import annotations

import math

from torch import nn


def batchnorm_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user's MLP with BatchNorm, which Opacus replaces by GroupNorm."""
    width = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(width, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, num_classes),
    )


def wide_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    width = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 32), nn.Tanh(), nn.Linear(32, num_classes))


def wrong_width_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A factory that ignores the contract's width: its first layer takes 7 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(7, num_classes))


def not_a_module(input_shape: tuple[int, ...], num_classes: int) -> object:
    return "a string"
