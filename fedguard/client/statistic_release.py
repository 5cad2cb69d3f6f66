"""The silo side of a *secure DP statistic*: compute, noise, charge, encode.

The trust layer asks every silo for a vector about its own records (fairness
counts per cohort, per-feature histograms, summed clipped attributions). Each
silo, for each query:

1. computes the vector with the silo's producer for the query's
   :class:`StatisticKind` (:data:`Producers`: the silo's own for feature moments
   and evaluation, the trust layer's from :mod:`fedguard.trust.silo_statistics`,
   given by the composition root), which also states the vector's L2
   sensitivity to adding or removing one record;
2. calibrates σ so that the release costs the query's ε at the δ of the silo's
   own budget (:func:`fedguard.privacy.analysis.release.calibrate_release_noise`),
   checks its persistent ledger can pay for a
   :class:`~fedguard.privacy.events.GaussianRelease` under the query's purpose,
   and adds N(0, (σ·Δ)²) noise from the CSPRNG
   (:class:`~fedguard.privacy.noise.CsprngGaussian`);
3. keeps the noised vector (so a replayed query is answered with the very same
   release, never a second one) and hands it to SecAgg+ (the ``train.secagg_*``
   stages), which reveals only the sum over the silos. The charge is committed
   (ledger and silo log) right before the release: at the mask stage under
   SecAgg, before the reply in clear (:mod:`fedguard.client.release`); a query
   that aborts before it costs nothing.

Each silo's release is thus (ε, δ)-DP for its own records whatever the server
and the other silos do. The price: the sum carries every contributing silo's
noise (n times one silo's variance), more than a trusted curator adding noise
once to the pooled sum would need; nobody has to be trusted.

Fixed-point encoding: the server sets the encoder's ``clip_range`` to half its
number of levels L, so one encoder step is exactly 1; the silo sends
``y − ½`` with ``y = noised / resolution`` (``resolution`` a public power of two
the server chooses), which the encoder maps to the integer ``y + ⌊L/2⌋`` when
``y`` is an integer (exact sums of counts with noise off) and rounds
stochastically (unbiased) otherwise. The server adds ``½`` per contributor back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import torch
from flwr.app import Message
from torch import nn

from fedguard.client.ledger_guard import open_silo_ledger
from fedguard.client.release import SPEND_METRICS, PendingCharge, charge_release, spend_metrics
from fedguard.client.silo import SiloSettings, check_contract, load_silo_data
from fedguard.client.training import silo_model
from fedguard.core.checks import positive, positive_int
from fedguard.core.datasets import SiloData
from fedguard.core.errors import ConfigError, LedgerError, ProtocolError, TrainingRefusedError
from fedguard.core.feature_moments import moment_layout
from fedguard.core.files import atomic_write_bytes
from fedguard.core.metrics import AUC_BINS
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.serialization import load_weights, record_to_weights
from fedguard.core.trust_config import TrustNoise
from fedguard.privacy.analysis.release import calibrate_release_noise, release_epsilon
from fedguard.privacy.events import GaussianRelease
from fedguard.privacy.ledger import ChargePurpose
from fedguard.privacy.noise import CsprngGaussian
from fedguard.privacy.secagg import SetupRequest
from fedguard.wire import protocol
from fedguard.wire.protocol import RoundInstructions
from fedguard.wire.secagg import payload
from fedguard.wire.statistics import (
    EVALUATION_LOSS_BOUND,
    StatisticKind,
    StatisticRequest,
    evaluation_vector_length,
)

__all__ = [
    "SILO_PRODUCERS",
    "Producer",
    "Producers",
    "ReleaseStore",
    "SecureStatistic",
    "evaluation_statistic",
    "feature_moments_statistic",
    "lattice_vector",
    "planned_release_events",
    "producer_for",
    "release_statistic",
    "released_values",
    "scaled_inputs",
]


@dataclass(frozen=True)
class SecureStatistic:
    """A silo's un-noised vector, with its L2 sensitivity to one record (add/remove).

    ``count`` > 1: the vector holds ``count`` independent queries, each of L2
    sensitivity ``l2_sensitivity`` (noised with the same σ, composed ``count``
    times in the ledger).
    """

    values: np.ndarray
    l2_sensitivity: float
    count: int = 1
    metadata: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
            raise ConfigError("a statistic is a non-empty 1-D vector of finite values")
        object.__setattr__(self, "values", values)
        positive("l2_sensitivity", self.l2_sensitivity)
        positive_int("count", self.count)


Producer = Callable[[SiloData, nn.Module | None, FeatureScaler, Mapping[str, Any]], SecureStatistic]
#: Which producer answers each kind of query. The silo agent holds one (passed in by
#: the composition root, :mod:`fedguard.apps.silo`); a kind it lacks is refused.
Producers = Mapping[StatisticKind, Producer]


def producer_for(producers: Producers, kind: StatisticKind) -> Producer:
    """The producer answering ``kind``; a typed refusal when this silo has none."""
    producer = producers.get(kind)
    if producer is None:
        raise ConfigError(f"this silo answers no {kind.value} statistics")
    return producer


# --------------------------------------------------------------------------- request


# --------------------------------------------------------------------------- replay store


class ReleaseStore:
    """Released (noised) vectors, kept so a replayed query resends the same release."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / "releases"

    def _path(self, run_id: str, purpose: ChargePurpose, query_round: int) -> Path:
        run_key = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        return self.directory / run_key / f"{purpose.value}-{query_round:05d}.npz"

    def save(
        self,
        run_id: str,
        purpose: ChargePurpose,
        query_round: int,
        values: np.ndarray,
        metrics: Mapping[str, float],
    ) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, values=values, metrics=np.array(json.dumps(dict(metrics))))
        atomic_write_bytes(self._path(run_id, purpose, query_round), buffer.getvalue())

    def load(
        self, run_id: str, purpose: ChargePurpose, query_round: int
    ) -> tuple[np.ndarray, dict[str, float]] | None:
        path = self._path(run_id, purpose, query_round)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["values"].copy(), json.loads(str(data["metrics"]))
        except (OSError, ValueError, KeyError) as bad:
            raise LedgerError(f"stored release {path} is unreadable: {bad}") from None


# --------------------------------------------------------------------------- producers


def scaled_inputs(silo: SiloData, scaler: FeatureScaler, train: bool) -> torch.Tensor:
    """A split's features, scaled and shaped as the model takes them."""
    part = silo.train if train else silo.test
    x = scaler.transform(part.features).reshape((-1, *silo.schema.input_shape))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def feature_moments_statistic(
    silo: SiloData, model: nn.Module | None, scaler: FeatureScaler, options: Mapping[str, Any]
) -> SecureStatistic:
    """The federated scaler's moments of the silo's training features on public bounds.

    Layout and L2 sensitivity √(1 + m + 2d): :mod:`fedguard.core.feature_moments`.
    No ``num-examples`` metadata: the row count is inside the vector, summed.
    """
    layout = moment_layout(silo.schema)
    return SecureStatistic(layout.vector(silo.train.features), layout.l2_sensitivity)


def evaluation_statistic(
    silo: SiloData, model: nn.Module | None, scaler: FeatureScaler, options: Mapping[str, Any]
) -> SecureStatistic:
    """Sums of the model's evaluation on the silo's test split (never trained on).

    Each record's cross-entropy is bounded by :data:`EVALUATION_LOSS_BOUND` L and
    summed divided by L; binary tasks add the score histograms the pooled ROC AUC
    is computed from. One record adds 1 to ``n``, at most 1 to ``correct`` and to
    the scaled loss, and 1 to one score bin: L2 sensitivity 2 (√3 without
    histograms). No ``num-examples`` metadata: the count is summed, not reported.
    """
    if model is None:
        raise ProtocolError("an evaluation query needs the model")
    bins = int(options.get("score-bins", AUC_BINS))
    if bins < 1:
        raise ProtocolError(f"score-bins must be >= 1, got {bins}")
    labels = silo.test.labels
    if len(labels) == 0:
        values = np.zeros(evaluation_vector_length(silo.schema.num_classes, bins))
    else:
        model.eval()
        with torch.no_grad():
            logits = model(scaled_inputs(silo, scaler, train=False))
            losses = nn.functional.cross_entropy(logits, torch.from_numpy(labels), reduction="none")
        loss = np.minimum(losses.double().numpy(), EVALUATION_LOSS_BOUND)
        correct = float((logits.argmax(dim=1).numpy() == labels).sum())
        head = [float(len(labels)), correct, float(loss.sum() / EVALUATION_LOSS_BOUND)]
        if silo.schema.num_classes != 2:
            values = np.asarray(head)
        else:
            scores = torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float64)
            index = np.clip((scores * bins).astype(np.int64), 0, bins - 1)
            positive = np.bincount(index[labels == 1], minlength=bins)
            negative = np.bincount(index[labels == 0], minlength=bins)
            values = np.concatenate([head, positive, negative]).astype(np.float64)
    sensitivity = 2.0 if silo.schema.num_classes == 2 else math.sqrt(3.0)
    return SecureStatistic(values, sensitivity)


#: What every silo answers on its own: the statistics training and evaluation need.
#: The trust layer's producers (fairness, drift, attribution) are added by the
#: composition root (:data:`fedguard.trust.silo_statistics.TRUST_PRODUCERS`).
SILO_PRODUCERS: Producers = {
    StatisticKind.FEATURE_MOMENTS: feature_moments_statistic,
    StatisticKind.EVALUATION: evaluation_statistic,
}


# --------------------------------------------------------------------------- release


def planned_release_events(epsilons: Sequence[float], delta: float) -> list[dp_accounting.DpEvent]:
    """The Gaussian releases a run plans after training, as events a plan composes in."""
    return [GaussianRelease(calibrate_release_noise(e, delta)).to_dp_event() for e in epsilons]


def lattice_vector(values: np.ndarray, resolution: float) -> np.ndarray:
    """What the silo hands the encoder: ``values / resolution − ½`` (see the module doc)."""
    return np.asarray(values, dtype=np.float64) / resolution - 0.5


def _model(
    settings: SiloSettings, message: Message, silo: SiloData, instructions: RoundInstructions
) -> nn.Module | None:
    if protocol.ARRAYS not in message.content.array_records:
        return None
    model = silo_model(settings, silo.schema, instructions)
    load_weights(model, record_to_weights(message.content.array_records[protocol.ARRAYS]))
    return model


def release_statistic(
    settings: SiloSettings, allow_non_private: bool, producers: Producers, message: Message
) -> tuple[np.ndarray, dict[str, float], PendingCharge | None]:
    """Compute, noise (charging the ledger first) and lattice-encode one statistic.

    The producer for :meth:`SecureAggregationClient.setup`: returns the vector to
    encode and the reply's metrics (``num-examples``, ``release-epsilon``,
    ``noise-multiplier``, ``l2-sensitivity``) and the charge the masked input will
    pay (committed at the mask stage; the mask reply carries ``epsilon-spent``).
    """
    setup = SetupRequest.from_bytes(payload(message))
    if setup.config.clip_range != setup.config.levels / 2:
        raise ProtocolError(
            "a statistic query needs the encoder's clip range at half its levels (one step = 1)"
        )
    request, values, metrics, pending = released_values(
        settings, allow_non_private, producers, message, secure=True
    )
    return lattice_vector(values, request.resolution), metrics, pending


def _policy_request(settings: SiloSettings, request: StatisticRequest) -> StatisticRequest:
    """An evaluation's noise is the silo's decision (its policy), never the server's."""
    if request.kind is not StatisticKind.EVALUATION:
        return request
    epsilon = settings.policy.evaluation_epsilon
    if epsilon is None:
        return dataclasses.replace(request, noise=TrustNoise.NONE)
    return dataclasses.replace(request, noise=TrustNoise.GAUSSIAN, target_epsilon=epsilon)


def released_values(
    settings: SiloSettings,
    allow_non_private: bool,
    producers: Producers,
    message: Message,
    *,
    secure: bool = False,
) -> tuple[StatisticRequest, np.ndarray, dict[str, float], PendingCharge | None]:
    """The request, the released (noised) vector, the reply's metrics and a pending charge.

    In clear (``secure`` False) the charge is committed before this returns; under
    SecAgg it is returned pending, for the mask stage (:func:`prepare_release`).

    What :func:`release_statistic` encodes for SecAgg+, and what a plain-mode
    feature-moments reply sends in clear (each silo's release is DP on its own).
    Exact sums need ``allow_non_private``, except an evaluation's: the test split
    is never trained on, and the silo's policy (``evaluation_epsilon``) alone
    decides whether it is noised.
    """
    request = _policy_request(settings, StatisticRequest.from_message(message))
    if protocol.CONFIG not in message.content.config_records:
        raise ProtocolError("statistic query has no config record")
    instructions = RoundInstructions.from_record(message.content.config_records[protocol.CONFIG])
    check_contract(settings, instructions.contract_name, instructions.contract_hash)
    if protocol.SCALER not in message.content.array_records:
        raise ProtocolError("statistic query has no scaler")
    scaler = FeatureScaler.from_arrays(
        {k: v.numpy() for k, v in message.content.array_records[protocol.SCALER].items()}
    )
    silo = load_silo_data(settings)
    statistic = producer_for(producers, request.kind)(
        silo, _model(settings, message, silo, instructions), scaler, request.options
    )
    if statistic.values.size != request.vector_length:
        raise ProtocolError(
            f"the {request.kind.value} query expects {request.vector_length} values, this "
            f"silo's statistic has {statistic.values.size}"
        )
    base = {
        "num-examples": float(statistic.metadata.get("num-examples", 1.0)),
        "l2-sensitivity": statistic.l2_sensitivity,
    }
    if request.noise is TrustNoise.NONE:
        if not allow_non_private and request.kind is not StatisticKind.EVALUATION:
            raise TrainingRefusedError(
                f"silo {settings.silo_id} releases statistics only with DP noise; "
                "the server asked for exact sums"
            )
        metrics = {**base, "noise-multiplier": 0.0, "release-epsilon": 0.0}
        return request, statistic.values, metrics, None
    noised, metrics, pending = prepare_release(
        settings, instructions.run_id, request, statistic, secure=secure
    )
    return request, noised, {**base, **metrics}, pending


def noised_release(
    settings: SiloSettings,
    run_id: str,
    request: StatisticRequest,
    statistic: SecureStatistic,
) -> tuple[np.ndarray, dict[str, float]]:
    """Noise ``statistic`` and release it in clear: charged (and logged) before it leaves."""
    noised, metrics, _ = prepare_release(settings, run_id, request, statistic, secure=False)
    return noised, metrics


def prepare_release(
    settings: SiloSettings,
    run_id: str,
    request: StatisticRequest,
    statistic: SecureStatistic,
    *,
    secure: bool,
) -> tuple[np.ndarray, dict[str, float], PendingCharge | None]:
    """The noised statistic, its metrics, and (``secure``) the charge its masked input pays.

    The budget is checked before the noise is drawn. In clear (``secure`` False)
    the reply is the release, so the charge is committed here; under SecAgg the
    masked input is, so the charge is returned pending and committed at the mask
    stage (:mod:`fedguard.client.release`). A release already kept is answered
    again (post-processing: no second charge).
    """
    purpose = request.kind.purpose
    delta = settings.budget.delta
    sigma = calibrate_release_noise(request.target_epsilon, delta, statistic.count)
    event = GaussianRelease(sigma, statistic.count)
    store = ReleaseStore(settings.state_dir)
    pending = PendingCharge(run_id, request.query_round, purpose, event)
    what = f"{purpose.value} query {request.query_round} of run {run_id!r}"
    with open_silo_ledger(settings) as ledger:
        entry = ledger.find(run_id, request.query_round, purpose)
        stored = store.load(run_id, purpose, request.query_round)
        if entry is not None and entry.event != event:
            raise LedgerError(
                f"{what} was charged as {entry.event}, now asked as {event}: refusing a "
                "second release"
            )
        if entry is None:
            ledger.check_affordable(event, what)
    if stored is not None:
        values, metrics = stored
        if values.size != statistic.values.size:
            raise ProtocolError("a replayed query asks for a vector of another length")
        if entry is not None:  # released before: the same values again, no new charge
            return values, {**metrics, "replayed": 1.0}, None
        # Kept for a secure release that never happened: this is its first release.
        metrics = {k: v for k, v in metrics.items() if k not in SPEND_METRICS}
    else:
        noise = CsprngGaussian().standard_normal(statistic.values.size)
        values = statistic.values + noise * (sigma * statistic.l2_sensitivity)
        metrics = {
            "noise-multiplier": sigma,
            "release-epsilon": release_epsilon(sigma, delta, statistic.count),
            "delta": delta,
        }
    if secure:
        store.save(run_id, purpose, request.query_round, values, metrics)
        return values, metrics, pending
    # Charged, then the silo stopped before anything was kept or sent: that charge
    # pays for this (first) release (charge_release finds it).
    spent = charge_release(settings, pending)
    metrics = {**metrics, **spend_metrics(settings, spent)}
    store.save(run_id, purpose, request.query_round, values, metrics)
    return values, metrics, None
