"""Models small enough for DP-SGD on a CPU, and the consortium's own.

Families (:class:`~fedguard.core.config.ModelFamily`): ``logistic`` (one linear
layer), ``mlp`` (:class:`TabularMLP`), ``cnn`` (:class:`SmallCNN`), ``auto`` (the
CNN for images, the MLP for tables), and ``factory``: a user's own module from
``package.module:function``. Every model is checked by Opacus's ``ModuleValidator``
before anyone trains it: what it can fix (BatchNorm becomes GroupNorm) is fixed,
the same way on every party, and logged; the rest is refused with its reasons.

GroupNorm, not BatchNorm: BatchNorm mixes samples inside a batch, so per-sample
gradients (and with them DP-SGD's clipping) are undefined; Opacus rejects it.

:func:`architecture_hash` names a model's architecture (its module tree and every
parameter's shape and dtype, not its values): the server sends it each round and
a silo whose own model hashes otherwise refuses.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

from fedguard.core.canonical import canonical_json
from fedguard.core.config import ModelFamily, ModelSpec
from fedguard.core.datasets import FeatureSchema
from fedguard.core.errors import ConfigError

log = logging.getLogger(__name__)


class TabularMLP(nn.Module):
    """A ReLU multilayer perceptron for tabular features."""

    def __init__(self, num_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        # hidden=(): no hidden layer, i.e. logistic (softmax) regression.
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


class ModelCheckError(ConfigError):
    """A model Opacus cannot train with per-sample gradients, or a broken factory."""


def load_factory(path: str) -> Callable[..., Any]:
    """The function ``package.module:function`` names (imported from this installation)."""
    module_name, _, function_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as missing:
        raise ModelCheckError(
            f"cannot import model factory module {module_name!r}: {missing}"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelCheckError(
            f"model factory {path!r}: {module_name} has no function {function_name!r}"
        )
    return function  # type: ignore[no-any-return]


def _from_factory(schema: FeatureSchema, spec: ModelSpec) -> nn.Module:
    try:
        model = load_factory(spec.factory)(
            input_shape=schema.input_shape, num_classes=schema.num_classes
        )
    except ModelCheckError:
        raise
    except Exception as failed:
        raise ModelCheckError(f"model factory {spec.factory!r} failed: {failed!r}") from None
    if not isinstance(model, nn.Module):
        raise ModelCheckError(
            f"model factory {spec.factory!r} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


def dp_ready(model: nn.Module, what: str, input_shape: tuple[int, ...]) -> nn.Module:
    """``model`` as Opacus can train it: validated, fixed where Opacus can, else refused.

    ModuleValidator misses layers Opacus has no per-sample gradient for (a bare
    ``nn.Parameter`` in a custom module), which would fail only inside the first
    DP-SGD round; so a two-record batch is also run through Opacus's hooks on a
    copy, and every trainable parameter must get its per-sample gradient.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        model = ModuleValidator.fix(model)
        remaining = ModuleValidator.validate(model, strict=False)
        if remaining:
            reasons = "; ".join(sorted({str(e) for e in remaining}))
            raise ModelCheckError(f"{what} cannot be trained with DP-SGD (Opacus): {reasons}")
        log.warning("%s: Opacus fixed %s", what, "; ".join(sorted({str(e) for e in errors})))
    _check_per_sample_gradients(model, what, input_shape)
    return model


def _check_per_sample_gradients(model: nn.Module, what: str, input_shape: tuple[int, ...]) -> None:
    import copy

    from opacus.grad_sample import GradSampleModule

    with torch.random.fork_rng(devices=[]):
        probe = GradSampleModule(copy.deepcopy(model))
        try:
            probe(torch.randn(2, *input_shape)).sum().backward()
        except Exception as failed:
            raise ModelCheckError(
                f"{what} fails a per-sample-gradient pass on inputs of shape "
                f"{list(input_shape)}: {failed!r}"
            ) from None
        missing = [
            name
            for name, parameter in probe.named_parameters()
            if parameter.requires_grad and getattr(parameter, "grad_sample", None) is None
        ]
    if missing:
        raise ModelCheckError(
            f"{what} has parameters Opacus computes no per-sample gradient for: "
            f"{[n.removeprefix('_module.') for n in missing]}; build them from supported layers "
            "(nn.Linear, nn.Conv*, nn.Embedding, nn.GroupNorm, nn.LayerNorm, ...)"
        )


def build_model(schema: FeatureSchema, spec: ModelSpec) -> nn.Module:
    """The model of ``spec`` for ``schema``, checked by Opacus's ModuleValidator."""
    family = spec.family
    if family is ModelFamily.AUTO:
        family = ModelFamily.CNN if len(schema.input_shape) == 3 else ModelFamily.MLP
    num_features = math.prod(schema.input_shape)
    if family is ModelFamily.CNN:
        return SmallCNN(schema.input_shape, schema.num_classes)
    if family is ModelFamily.MLP:
        return TabularMLP(num_features, spec.hidden, schema.num_classes)
    if family is ModelFamily.LOGISTIC:
        return TabularMLP(num_features, (), schema.num_classes)
    return dp_ready(
        _from_factory(schema, spec), f"model factory {spec.factory!r}", schema.input_shape
    )


@cache
def model_hash_for(schema: FeatureSchema, spec: ModelSpec) -> str:
    """The architecture hash of the model ``spec`` builds for ``schema``.

    Built under a forked torch RNG: hashing must not move anyone's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        return architecture_hash(build_model(schema, spec))


def architecture_hash(model: nn.Module) -> str:
    """SHA-256 of the module tree and every parameter's and buffer's shape and dtype."""
    tree = [
        [name, type(module).__qualname__, module.extra_repr()]
        for name, module in model.named_modules()
    ]
    tensors = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    return hashlib.sha256(canonical_json({"modules": tree, "tensors": tensors})).hexdigest()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
