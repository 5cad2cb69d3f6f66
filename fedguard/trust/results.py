"""What the trust layer's post-training phase records, as the reports read it.

Note to 7a (``fedguard/trust/phase.py``): this module fixes the format of
``RUN/<variant>/trust.json`` that ``fedguard.simulation.report`` and
``fedguard.edge.card`` read. Build a :class:`TrustResults` and write
``results.to_json()`` with :func:`write_trust_results`; every section is optional
(``None`` / empty) and the reports omit what is absent. Attributions come back
from the secure sum as one vector ``[Σ|cᵢ| (d), Σcᵢ (d), n]`` of
:func:`attribution_vector_length` values (cᵢ a record's clipped attributions):
:func:`attribution_from_sum` turns it into an :class:`AttributionResult`.

Every section carries the :class:`ReleaseCost` it charged each silo's ledger: the
noised sums come from secure aggregation, so the server sees only the sum of the
silos' vectors, each silo having added its own Gaussian noise before masking. The
sum therefore carries the noise of every contributing silo (``contributors``
times the variance of one silo's noise): more noise than a trusted curator would
add, in exchange for trusting no one.

Pure functions and frozen dataclasses only: this module imports nothing of
fedguard but :mod:`fedguard.core`, so the server, the simulation and the edge
path can all use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.core.errors import FedguardError
from fedguard.core.files import atomic_write_json

__all__ = [
    "TRUST_FILENAME",
    "TRUST_RESULTS_VERSION",
    "AttributionResult",
    "DriftResult",
    "FairnessResult",
    "FeatureAttribution",
    "FeatureDrift",
    "GroupMetrics",
    "ReleaseCost",
    "TrustResults",
    "TrustResultsError",
    "attribution_from_sum",
    "attribution_vector_length",
    "read_trust_results",
    "write_trust_results",
]

TRUST_FILENAME = "trust.json"
TRUST_RESULTS_VERSION = 1


class TrustResultsError(FedguardError):
    """A trust-results file or record is malformed."""


def _require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise TrustResultsError(f"{where}: missing field {key!r}")
    return data[key]


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _json_float(value: float | None) -> float | None:
    # Strict JSON has no NaN: an undefined metric is written as null.
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def _mapping(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise TrustResultsError(f"{where}: expected an object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class ReleaseCost:
    """What one secure DP release cost each contributing silo.

    ``epsilon`` is the ε of this release alone at ``delta`` (the ledgers compose it
    with everything else; ``inf`` with the noise off, which only research runs may
    do); ``epsilon_by_silo`` is each silo's lifetime ε after the charge, when known.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    contributors: int
    epsilon_by_silo: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise TrustResultsError(f"release ε must be >= 0, got {self.epsilon}")
        if math.isinf(self.epsilon) and self.noise_multiplier > 0:
            raise TrustResultsError("a noised release has a finite ε")
        if not 0 <= self.delta < 1:
            raise TrustResultsError(f"release δ must be in [0, 1), got {self.delta}")
        if self.noise_multiplier < 0:
            raise TrustResultsError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if self.contributors < 0:
            raise TrustResultsError(f"contributors must be >= 0, got {self.contributors}")

    @property
    def noised(self) -> bool:
        return self.noise_multiplier > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "epsilon": None if math.isinf(self.epsilon) else self.epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "contributors": self.contributors,
            "epsilon_by_silo": dict(self.epsilon_by_silo),
        }

    @classmethod
    def from_json(cls, data: object) -> ReleaseCost:
        d = _mapping(data, "release cost")
        # Strict JSON writes the ε of an un-noised release (∞) as null.
        epsilon = _require(d, "epsilon", "release cost")
        return cls(
            epsilon=math.inf if epsilon is None else float(epsilon),
            delta=float(_require(d, "delta", "release cost")),
            noise_multiplier=float(_require(d, "noise_multiplier", "release cost")),
            contributors=int(_require(d, "contributors", "release cost")),
            epsilon_by_silo={str(k): float(v) for k, v in d.get("epsilon_by_silo", {}).items()},
        )


# --------------------------------------------------------------------------- fairness


@dataclass(frozen=True)
class GroupMetrics:
    """Metrics of one cohort of the sensitive attribute, from (noised) summed counts."""

    group: str
    n: float
    accuracy: float | None
    auc: float | None
    tpr: float | None
    fpr: float | None
    selection_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "n": self.n,
            "accuracy": _json_float(self.accuracy),
            "auc": _json_float(self.auc),
            "tpr": _json_float(self.tpr),
            "fpr": _json_float(self.fpr),
            "selection_rate": _json_float(self.selection_rate),
        }

    @classmethod
    def from_json(cls, data: object) -> GroupMetrics:
        d = _mapping(data, "group metrics")
        return cls(
            group=str(_require(d, "group", "group metrics")),
            n=float(_require(d, "n", "group metrics")),
            accuracy=_float_or_none(d.get("accuracy")),
            auc=_float_or_none(d.get("auc")),
            tpr=_float_or_none(d.get("tpr")),
            fpr=_float_or_none(d.get("fpr")),
            selection_rate=_float_or_none(d.get("selection_rate")),
        )


@dataclass(frozen=True)
class FairnessResult:
    attribute: str
    groups: tuple[GroupMetrics, ...]
    demographic_parity_difference: float | None
    equalized_odds_difference: float | None
    cost: ReleaseCost

    def to_json(self) -> dict[str, Any]:
        return {
            "attribute": self.attribute,
            "groups": [g.to_json() for g in self.groups],
            "demographic_parity_difference": _json_float(self.demographic_parity_difference),
            "equalized_odds_difference": _json_float(self.equalized_odds_difference),
            "cost": self.cost.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> FairnessResult:
        d = _mapping(data, "fairness")
        return cls(
            attribute=str(_require(d, "attribute", "fairness")),
            groups=tuple(GroupMetrics.from_json(g) for g in _require(d, "groups", "fairness")),
            demographic_parity_difference=_float_or_none(d.get("demographic_parity_difference")),
            equalized_odds_difference=_float_or_none(d.get("equalized_odds_difference")),
            cost=ReleaseCost.from_json(_require(d, "cost", "fairness")),
        )


# --------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    js: float
    alert: bool

    def to_json(self) -> dict[str, Any]:
        return {"feature": self.feature, "psi": self.psi, "js": self.js, "alert": self.alert}

    @classmethod
    def from_json(cls, data: object) -> FeatureDrift:
        d = _mapping(data, "feature drift")
        return cls(
            feature=str(_require(d, "feature", "feature drift")),
            psi=float(_require(d, "psi", "feature drift")),
            js=float(_require(d, "js", "feature drift")),
            alert=bool(_require(d, "alert", "feature drift")),
        )


@dataclass(frozen=True)
class DriftResult:
    """One monitoring comparison against the training-time reference histograms."""

    threshold: float
    metric: str  # which statistic the threshold applies to: "psi" or "js"
    features: tuple[FeatureDrift, ...]
    cost: ReleaseCost
    label: str = "reference"  # e.g. "reference" at training time, "monitor round 3"

    @property
    def alerts(self) -> tuple[str, ...]:
        return tuple(f.feature for f in self.features if f.alert)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "metric": self.metric,
            "label": self.label,
            "features": [f.to_json() for f in self.features],
            "alerts": list(self.alerts),
            "cost": self.cost.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> DriftResult:
        d = _mapping(data, "drift")
        return cls(
            threshold=float(_require(d, "threshold", "drift")),
            metric=str(d.get("metric", "psi")),
            features=tuple(FeatureDrift.from_json(f) for f in _require(d, "features", "drift")),
            cost=ReleaseCost.from_json(_require(d, "cost", "drift")),
            label=str(d.get("label", "reference")),
        )


# --------------------------------------------------------------------------- attributions


@dataclass(frozen=True)
class FeatureAttribution:
    """A feature's global importance (mean |attribution|) and direction (signed mean)."""

    feature: str
    mean_abs_attribution: float
    mean_attribution: float

    def to_json(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "mean_abs_attribution": self.mean_abs_attribution,
            "mean_attribution": self.mean_attribution,
        }

    @classmethod
    def from_json(cls, data: object) -> FeatureAttribution:
        d = _mapping(data, "feature attribution")
        return cls(
            feature=str(_require(d, "feature", "feature attribution")),
            mean_abs_attribution=float(_require(d, "mean_abs_attribution", "feature attribution")),
            mean_attribution=float(_require(d, "mean_attribution", "feature attribution")),
        )


@dataclass(frozen=True)
class AttributionResult:
    """Mean Integrated-Gradients attribution per feature over every silo's records.

    ``features`` is ranked by mean |attribution| (the importance), largest first.
    ``records`` is the (noised) summed record count the means were divided by.
    """

    model: str  # "global" (the federated model) or "student" (the distilled edge model)
    features: tuple[FeatureAttribution, ...]
    records: float
    clip_norm: float
    steps: int
    output: str  # what was attributed, e.g. "log-odds of class 1"
    cost: ReleaseCost

    def top(self, k: int) -> tuple[FeatureAttribution, ...]:
        return self.features[:k]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "features": [f.to_json() for f in self.features],
            "records": self.records,
            "clip_norm": self.clip_norm,
            "steps": self.steps,
            "output": self.output,
            "cost": self.cost.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> AttributionResult:
        d = _mapping(data, "attributions")
        features = tuple(
            FeatureAttribution.from_json(f) for f in _require(d, "features", "attributions")
        )
        return cls(
            model=str(_require(d, "model", "attributions")),
            features=features,
            records=float(_require(d, "records", "attributions")),
            clip_norm=float(_require(d, "clip_norm", "attributions")),
            steps=int(_require(d, "steps", "attributions")),
            output=str(d.get("output", "")),
            cost=ReleaseCost.from_json(_require(d, "cost", "attributions")),
        )


def attribution_vector_length(num_features: int) -> int:
    """Length of the attribution statistic: ``[Σ|cᵢ| (d), Σcᵢ (d), n]``."""
    return 2 * num_features + 1


def attribution_from_sum(
    vector: np.ndarray,
    feature_names: Sequence[str],
    *,
    model: str,
    clip_norm: float,
    steps: int,
    output: str,
    cost: ReleaseCost,
) -> AttributionResult:
    """Mean |attribution| and mean attribution per feature from the secure sum.

    ``vector`` is ``[Σ|cᵢ| (d), Σcᵢ (d), n]`` summed over the silos. Post-processing
    of the DP release (no further privacy cost). A noised count can come out below
    one on tiny federations; it is floored at one so the means stay finite (they
    are then dominated by noise, which the cost records). Noise can also make a
    summed |cᵢ| negative; it is shown as it came out, not clipped, so that the
    figures stay unbiased.
    """
    values = np.asarray(vector, dtype=np.float64).reshape(-1)
    d = len(feature_names)
    if values.shape[0] != attribution_vector_length(d):
        raise TrustResultsError(
            f"attribution vector has {values.shape[0]} values; expected "
            f"{attribution_vector_length(d)} (2 × {d} sums and a count)"
        )
    if not np.isfinite(values).all():
        raise TrustResultsError("attribution vector holds non-finite values")
    records = float(values[2 * d])
    importance = values[:d] / max(records, 1.0)
    direction = values[d : 2 * d] / max(records, 1.0)
    order = np.argsort(-importance, kind="stable")
    return AttributionResult(
        model=model,
        features=tuple(
            FeatureAttribution(feature_names[i], float(importance[i]), float(direction[i]))
            for i in order
        ),
        records=records,
        clip_norm=clip_norm,
        steps=steps,
        output=output,
        cost=cost,
    )


# --------------------------------------------------------------------------- file


@dataclass(frozen=True)
class TrustResults:
    """Everything the trust phase of one run variant produced; any part may be absent."""

    fairness: FairnessResult | None = None
    drift: tuple[DriftResult, ...] = ()
    attributions: tuple[AttributionResult, ...] = ()

    @property
    def empty(self) -> bool:
        return self.fairness is None and not self.drift and not self.attributions

    def attribution(self, model: str) -> AttributionResult | None:
        return next((a for a in self.attributions if a.model == model), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "fedguard_trust_version": TRUST_RESULTS_VERSION,
            "fairness": self.fairness.to_json() if self.fairness is not None else None,
            "drift": [d.to_json() for d in self.drift],
            "attributions": [a.to_json() for a in self.attributions],
        }

    @classmethod
    def from_json(cls, data: object) -> TrustResults:
        d = _mapping(data, "trust results")
        version = d.get("fedguard_trust_version")
        if version != TRUST_RESULTS_VERSION:
            raise TrustResultsError(
                f"trust results version {version!r}; this fedguard reads {TRUST_RESULTS_VERSION}"
            )
        fairness = d.get("fairness")
        return cls(
            fairness=FairnessResult.from_json(fairness) if fairness is not None else None,
            drift=tuple(DriftResult.from_json(x) for x in d.get("drift") or ()),
            attributions=tuple(AttributionResult.from_json(x) for x in d.get("attributions") or ()),
        )


def write_trust_results(directory: Path, results: TrustResults) -> Path:
    path = Path(directory) / TRUST_FILENAME
    atomic_write_json(path, results.to_json())
    return path


def read_trust_results(directory: Path) -> TrustResults | None:
    """``directory/trust.json``, or ``None`` when the run has no trust results."""
    path = Path(directory) / TRUST_FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as bad:
        raise TrustResultsError(f"{path} is not JSON: {bad}") from None
    try:
        return TrustResults.from_json(data)
    except (TypeError, ValueError) as bad:
        raise TrustResultsError(f"{path}: {bad}") from None
