"""Explanations computed where the records live: Integrated Gradients with Captum.

Integrated Gradients (Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep
Networks", ICML 2017) attributes ``f(x) − f(x')`` to the input features by
integrating the gradient along the straight path from a baseline ``x'`` to ``x``;
by the completeness axiom (their Proposition 1) the attributions of one record
sum to ``f(x) − f(x')``, up to the error of the numerical integral (Captum's
Gauss–Legendre rule with a fixed number of steps; the error is reported).

Choices:

* **Baseline**: the all-zero *standardized* input, i.e. the federated feature
  mean (missing values are imputed with it too); for one-hot and pixel features,
  which are not standardized, zero is "no category" / a blank pixel.
* **What is attributed**: for binary tasks the log-odds of the positive class
  (``logit₁ − logit₀``; the logits of a softmax are only defined up to a shared
  shift, their difference is not); for more classes the log-probability of the
  class the model predicts for that record.

Global attributions (:func:`attribution_vector`): each silo attributes every
record of its own split, clips each record's attribution vector to L2 norm ``C``
and sends ``[Σ|cᵢ|, Σcᵢ, n]``: the sums of the clipped attributions' absolute
values and of the signed values, then its record count. The absolute values give
the global importance of a feature (mean |attribution|, as mean |SHAP|); the
signed mean alone would not: with the mean as baseline, a feature the model uses
linearly has signed attributions ``w·(x − μ)`` that average to about zero over the
population. Adding or removing one record moves the vector by at most
``sqrt(2C² + 1)`` in L2 (``|cᵢ|`` and ``cᵢ`` have norm ≤ C, the count moves by 1):
its sensitivity, which the silo's Gaussian noise is scaled by before the vector
leaves (see :mod:`fedguard.client.statistic_release`). The server divides the securely
summed sums by the summed count
(:func:`fedguard.trust.results.attribution_from_sum`).

Local explanations (:func:`explain_record`): one record's attributions, computed
on the machine that holds the record and printed there; nothing is sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

from fedguard.client.statistic_release import SecureStatistic
from fedguard.core.checks import positive, positive_int
from fedguard.core.datasets import FeatureSchema, SiloData
from fedguard.core.errors import ConfigError, ProtocolError
from fedguard.core.preprocessing import FeatureScaler

__all__ = [
    "AttributionSettings",
    "DataSplit",
    "ExplainedOutput",
    "IntegratedGradientsResult",
    "LocalExplanation",
    "attribution_sensitivity",
    "attribution_statistic",
    "attribution_vector",
    "clip_rows",
    "explain_record",
    "integrated_gradients",
    "output_description",
]


class DataSplit(StrEnum):
    """Which of a silo's splits the global attributions run on."""

    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True)
class AttributionSettings:
    """How a silo computes its attribution vector (sent with the server's query)."""

    clip_norm: float = 1.0
    steps: int = 32
    split: DataSplit = DataSplit.TRAIN
    batch_rows: int = 256

    KEYS = ("attribution-clip-norm", "attribution-steps", "attribution-split")

    def __post_init__(self) -> None:
        positive("attribution clip norm", self.clip_norm)
        positive_int("attribution steps", self.steps)
        if not isinstance(self.split, DataSplit):
            raise ConfigError(f"attribution split must be a DataSplit, got {self.split!r}")
        positive_int("attribution batch rows", self.batch_rows)

    def to_options(self) -> dict[str, Any]:
        return {
            "attribution-clip-norm": float(self.clip_norm),
            "attribution-steps": self.steps,
            "attribution-split": self.split.value,
        }

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AttributionSettings:
        """Settings from flat option keys; absent keys keep their defaults."""
        base = cls()
        split_text = options.get("attribution-split", base.split.value)
        try:
            split = DataSplit(str(split_text))
        except ValueError:
            raise ConfigError(
                f"attribution-split must be one of {[s.value for s in DataSplit]}, "
                f"got {split_text!r}"
            ) from None
        steps = options.get("attribution-steps", base.steps)
        clip = options.get("attribution-clip-norm", base.clip_norm)
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        return cls(clip_norm=clip, steps=steps, split=split)


# --------------------------------------------------------------------------- IG


class ExplainedOutput(nn.Module):
    """The scalar that is explained: positive-class log-odds, or per-class log-probabilities.

    Binary: one output per record, ``logit₁ − logit₀``. More classes:
    ``log_softmax`` per class; the caller picks the predicted class as the target.
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.binary = num_classes == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.binary:
            return logits[:, 1] - logits[:, 0]  # type: ignore[no-any-return]
        return torch.log_softmax(logits, dim=1)


def output_description(schema: FeatureSchema) -> str:
    if schema.is_binary:
        return f"log-odds of class {schema.class_names[1]!r} (logit₁ − logit₀)"
    return "log-probability of the predicted class"


@dataclass(frozen=True)
class IntegratedGradientsResult:
    """Per record: attributions (n, d) float64, the explained value at x and the baseline,
    the target class (−1 for binary log-odds), and the completeness error."""

    attributions: np.ndarray
    output: np.ndarray
    baseline_output: np.ndarray
    targets: np.ndarray
    delta: np.ndarray


def integrated_gradients(
    model: nn.Module,
    inputs: np.ndarray,
    num_classes: int,
    steps: int = 32,
    batch_rows: int = 256,
) -> IntegratedGradientsResult:
    """Integrated Gradients of every row of ``inputs`` (scaled, model-shaped float32).

    Baseline: all zeros (the federated mean). ``delta`` is Captum's convergence
    delta, ``Σ attributions − (f(x) − f(0))`` per record.
    """
    if inputs.dtype != np.float32 or inputs.ndim < 2:
        raise ConfigError(f"inputs must be float32 of shape (n, ...), got {inputs.dtype}")
    model.eval()
    wrapped = ExplainedOutput(model, num_classes).eval()
    ig = IntegratedGradients(wrapped)
    n = inputs.shape[0]
    d = math.prod(inputs.shape[1:])
    attributions = np.zeros((n, d), dtype=np.float64)
    output = np.zeros(n, dtype=np.float64)
    baseline_output = np.zeros(n, dtype=np.float64)
    targets = np.full(n, -1, dtype=np.int64)
    delta = np.zeros(n, dtype=np.float64)
    for start in range(0, n, batch_rows):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_rows]))
        baseline = torch.zeros_like(x)
        with torch.no_grad():
            fx = wrapped(x)
            fb = wrapped(baseline)
        rows = slice(start, start + x.shape[0])
        target: torch.Tensor | None = None
        if wrapped.binary:
            output[rows] = fx.double().numpy()
            baseline_output[rows] = fb.double().numpy()
        else:
            target = fx.argmax(dim=1)
            targets[rows] = target.numpy()
            output[rows] = fx.gather(1, target[:, None])[:, 0].double().numpy()
            baseline_output[rows] = fb.gather(1, target[:, None])[:, 0].double().numpy()
        attr, conv = ig.attribute(
            x,
            baselines=baseline,
            target=target,
            n_steps=steps,
            method="gausslegendre",
            return_convergence_delta=True,
        )
        attributions[rows] = attr.detach().double().reshape(x.shape[0], d).numpy()
        delta[rows] = conv.detach().double().numpy()
    return IntegratedGradientsResult(attributions, output, baseline_output, targets, delta)


# --------------------------------------------------------------------------- global


def clip_rows(attributions: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row scaled to L2 norm at most ``clip_norm`` (rows already inside are unchanged).

    Bounds what one record contributes to a sum, as DP-SGD bounds a gradient
    (Abadi et al., CCS 2016): the sum's L2 sensitivity is then ``clip_norm``.
    """
    if not clip_norm > 0:
        raise ConfigError(f"clip norm must be > 0, got {clip_norm}")
    a = np.asarray(attributions, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"attributions must be (n, d), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ConfigError("attributions hold non-finite values")
    norms = np.linalg.norm(a, axis=1)
    factors = np.minimum(1.0, clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    clipped: np.ndarray = a * factors[:, None]
    return clipped


def attribution_sensitivity(clip_norm: float) -> float:
    """L2 sensitivity of ``[Σ|cᵢ|, Σcᵢ, n]`` to one record: ``sqrt(2C² + 1)``."""
    return math.sqrt(2.0 * clip_norm**2 + 1.0)


def attribution_vector(
    model: nn.Module, inputs: np.ndarray, num_classes: int, settings: AttributionSettings
) -> np.ndarray:
    """A silo's un-noised contribution ``[Σ|cᵢ| (d), Σcᵢ (d), n]``, cᵢ = clip(aᵢ, C); float64."""
    result = integrated_gradients(
        model, inputs, num_classes, steps=settings.steps, batch_rows=settings.batch_rows
    )
    clipped = clip_rows(result.attributions, settings.clip_norm)
    return np.concatenate(
        [np.abs(clipped).sum(axis=0), clipped.sum(axis=0), [float(inputs.shape[0])]]
    )


def attribution_statistic(
    silo: SiloData, model: nn.Module | None, scaler: FeatureScaler, options: Mapping[str, Any]
) -> SecureStatistic:
    """The ``attribution`` producer (:mod:`fedguard.client.statistic_release`, the module doc).

    The vector ``[Σ|cᵢ|, Σcᵢ, n]`` of the split the query names; its L2 sensitivity
    to one record is ``sqrt(2C² + 1)``.
    """
    if model is None:
        raise ProtocolError("an attribution query needs the model")
    settings = AttributionSettings.from_options(options)
    part = silo.train if settings.split is DataSplit.TRAIN else silo.test
    inputs = scaler.transform(part.features).reshape((-1, *silo.schema.input_shape))
    vector = attribution_vector(model, inputs, silo.schema.num_classes, settings)
    return SecureStatistic(
        vector,
        attribution_sensitivity(settings.clip_norm),
        metadata={"num-examples": float(len(part))},
    )


# --------------------------------------------------------------------------- local


@dataclass(frozen=True)
class LocalExplanation:
    """One record's explanation, computed and kept where the record lives."""

    feature_names: tuple[str, ...]
    values: np.ndarray  # the record's encoded features (NaN = missing)
    attributions: np.ndarray  # one per feature
    predicted_class: str
    probabilities: np.ndarray
    output_name: str
    output: float
    baseline_output: float
    completeness_error: float

    def ranked(self) -> list[tuple[str, float, float]]:
        """(feature, value, attribution), largest |attribution| first."""
        order = np.argsort(-np.abs(self.attributions), kind="stable")
        return [
            (self.feature_names[i], float(self.values[i]), float(self.attributions[i]))
            for i in order
        ]

    def to_json(self, top: int | None = None) -> dict[str, Any]:
        ranked = self.ranked()[: top if top is not None else len(self.feature_names)]
        return {
            "predicted_class": self.predicted_class,
            "probabilities": [float(p) for p in self.probabilities],
            "explained_output": self.output_name,
            "output": self.output,
            "baseline_output": self.baseline_output,
            "completeness_error": self.completeness_error,
            "features": [
                {
                    "feature": name,
                    "value": None if math.isnan(value) else value,
                    "attribution": attr,
                }
                for name, value, attr in ranked
            ],
        }

    def render(self, top: int = 10) -> str:
        probs = ", ".join(f"{p:.3f}" for p in self.probabilities)
        lines = [
            f"prediction: {self.predicted_class} (probabilities {probs})",
            f"explained: {self.output_name} = {self.output:.4f}; at the baseline (the "
            f"federated mean) {self.baseline_output:.4f}; attributions sum to the difference "
            f"within {self.completeness_error:.2e}",
            "",
            f"{'feature':<28} {'value':>10} {'attribution':>12}",
        ]
        for name, value, attr in self.ranked()[:top]:
            shown = "missing" if math.isnan(value) else f"{value:.4g}"
            lines.append(f"{name:<28} {shown:>10} {attr:>+12.4f}")
        return "\n".join(lines)


def explain_record(
    model: nn.Module,
    scaler: FeatureScaler,
    schema: FeatureSchema,
    features: Sequence[float] | np.ndarray,
    steps: int = 64,
) -> LocalExplanation:
    """Integrated Gradients of one encoded record against the federated-mean baseline."""
    row = np.asarray(features, dtype=np.float64).reshape(1, -1)
    if row.shape[1] != schema.num_features:
        raise ConfigError(
            f"the record has {row.shape[1]} features; the {schema.dataset} model takes "
            f"{schema.num_features}"
        )
    x = scaler.transform(row).reshape((1, *schema.input_shape))
    result = integrated_gradients(model, x, schema.num_classes, steps=steps)
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(x)), dim=1)[0].double().numpy()
    predicted = int(probabilities.argmax())
    return LocalExplanation(
        feature_names=tuple(schema.feature_names),
        values=row[0],
        attributions=result.attributions[0],
        predicted_class=schema.class_names[predicted],
        probabilities=probabilities,
        output_name=output_description(schema),
        output=float(result.output[0]),
        baseline_output=float(result.baseline_output[0]),
        completeness_error=float(abs(result.delta[0])),
    )
