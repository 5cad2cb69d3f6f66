"""The trust layer's server side: fairness audit, drift reference and monitoring.

After the last round, :func:`trust_phase` asks the silos (each through one
secure DP statistic, :func:`~fedguard.server.statistic_collection.collect_secure_statistic`)

* for the fairness audit of the final model on their test splits, by cohort of
  the configured sensitive attribute (:mod:`fedguard.trust.fairness`);
* for the drift reference: per-feature histograms of their training inputs on
  bins fixed from the federated scaler (:mod:`fedguard.core.histograms`), whose
  sparse bins are then merged (:func:`~fedguard.trust.drift.merge_bins`);
* for global Integrated-Gradients attributions of the final model;

and writes ``trust.json`` (:mod:`fedguard.trust.results`), the drift
reference ``drift-reference.json`` and one line per release to
``trust-log.jsonl`` in the run folder. :func:`monitor_drift` runs one later
monitoring round against the stored reference (``fedguard monitor``).

Query rounds name each release in the silos' ledgers (with the run id and the
kind): the audit and the reference are query round 0, monitoring round k is
query round k. A resumed or repeated phase replays the silos' stored releases;
nothing is charged twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedguard.core.config import RunConfig
from fedguard.core.datasets import schema_for
from fedguard.core.errors import DataError, FedguardError
from fedguard.core.files import atomic_write_json
from fedguard.core.histograms import bin_edges
from fedguard.core.models import model_hash_for
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.sensitive_groups import sensitive_groups
from fedguard.core.serialization import ModelWeights, weights_to_record
from fedguard.privacy.secagg import SecAggAbort
from fedguard.server.post_training import FinalModel
from fedguard.server.secure_metrics import SiloName
from fedguard.server.statistic_collection import SecureStatisticResult, collect_secure_statistic
from fedguard.trust.drift import drift_scores, merge_bins
from fedguard.trust.fairness import (
    FairnessCounts,
    calibration,
    demographic_parity_difference,
    equalized_odds_difference,
    group_metrics,
)
from fedguard.trust.results import (
    AttributionResult,
    DriftResult,
    FairnessResult,
    FeatureDrift,
    GroupMetrics,
    ReleaseCost,
    TrustResults,
    attribution_from_sum,
    attribution_vector_length,
    write_trust_results,
)
from fedguard.wire import protocol
from fedguard.wire.protocol import RoundInstructions
from fedguard.wire.statistics import SCORE_BINS, StatisticKind, fairness_vector_length

log = logging.getLogger(__name__)
_Released = TypeVar("_Released")

REFERENCE_FILENAME = "drift-reference.json"
LOG_FILENAME = "trust-log.jsonl"
_REFERENCE_VERSION = 1

# --------------------------------------------------------------------------- costs and log


def trust_instruction(
    config: RunConfig, run_id: str, weights: ModelWeights, scaler: FeatureScaler
) -> RecordDict:
    """The query content about a finished run's model: config, model arrays, scaler."""
    instructions = RoundInstructions(
        run_id=run_id,
        round=config.num_rounds,
        planned_rounds=config.num_rounds,
        seed=config.seed,
        contract_name=config.contract.name,
        contract_hash=config.contract.content_hash(),
        model=config.model,
        training=config.training,
        local_dp=config.local_dp,
        model_hash=model_hash_for(schema_for(config.contract), config.model),
    )
    return RecordDict(
        {
            protocol.CONFIG: instructions.to_record(),
            protocol.ARRAYS: weights_to_record(weights),
            protocol.SCALER: ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in scaler.to_arrays().items()}
            ),
        }
    )


def release_cost(result: SecureStatisticResult, silo_name: SiloName) -> ReleaseCost:
    """What one release cost: the largest per-silo ε and σ, and each silo's lifetime ε."""
    deltas = [
        m["delta"] for n, m in result.metrics.items() if "delta" in m and n in result.contributors
    ]
    return ReleaseCost(
        epsilon=max(result.release_epsilon.values(), default=0.0),
        delta=max(deltas, default=0.0),
        noise_multiplier=max(result.noise_multiplier.values(), default=0.0),
        contributors=len(result.contributors),
        epsilon_by_silo={silo_name(n): e for n, e in result.epsilon_spent.items()},
    )


def append_log(run_dir: Path, entry: Mapping[str, Any]) -> None:
    """One JSON line per release or monitoring round in the run folder's trust log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": datetime.now(UTC).isoformat(), **entry}, sort_keys=True)
    with (run_dir / LOG_FILENAME).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")


# --------------------------------------------------------------------------- fairness


def fairness_counts(groups: Sequence[str], vector: np.ndarray, score_bins: int) -> FairnessCounts:
    """Unpack the audit's summed vector (layout of :func:`fairness_vector_length`)."""
    g = len(groups)
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (fairness_vector_length(g, score_bins),):
        raise DataError(f"fairness vector of shape {v.shape} for {g} groups, {score_bins} bins")
    tp, fp, tn, fn = (v[i * g : (i + 1) * g] for i in range(4))
    hist = v[4 * g :].reshape(3, g, score_bins)
    return FairnessCounts(tuple(groups), tp, fp, tn, fn, hist[0], hist[1], hist[2])


def fairness_audit(final: FinalModel) -> tuple[FairnessResult, dict[str, Any]]:
    """The audit of the final model by cohort; (result, calibration per group)."""
    config = final.config
    trust = config.trust
    if trust.fairness_attribute is None:
        raise DataError("no sensitive attribute configured")
    groups = sensitive_groups(
        schema_for(config.contract), trust.fairness_attribute, trust.fairness_bands
    )
    result = collect_secure_statistic(
        final.send,
        final.nodes,
        StatisticKind.FAIRNESS,
        instruction=final.instruction,
        vector_length=fairness_vector_length(groups.num_groups, SCORE_BINS),
        query_round=0,
        target_epsilon=trust.fairness_epsilon,
        noise=trust.noise,
        options={
            "attribute": groups.attribute,
            "bands": list(groups.bands),
            "score-bins": SCORE_BINS,
        },
        identities=final.identities,
    )
    counts = fairness_counts(groups.names, result.values, SCORE_BINS)
    metrics = group_metrics(counts)
    cost = release_cost(result, final.silo_name)
    fairness = FairnessResult(
        attribute=groups.attribute,
        groups=tuple(
            GroupMetrics(m.group, m.n, m.accuracy, m.auc, m.tpr, m.fpr, m.selection_rate)
            for m in metrics
        ),
        demographic_parity_difference=demographic_parity_difference(metrics),
        equalized_odds_difference=equalized_odds_difference(metrics),
        cost=cost,
    )
    calibration_table = {
        m.group: {
            "ece": m.ece,
            "bins": [vars(b) for b in calibration(counts, g)[0]],
        }
        for g, m in enumerate(metrics)
    }
    return fairness, calibration_table


# --------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class DriftReference:
    """The training-time reference: fixed edges, the released counts, the bin merge."""

    feature_names: tuple[str, ...]
    edges: np.ndarray  # (d, bins − 1)
    counts: np.ndarray  # (d, bins), noised sum at training time
    merge: np.ndarray  # (d, bins) merged-bin index
    threshold: float
    cost: ReleaseCost

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _REFERENCE_VERSION,
            "feature_names": list(self.feature_names),
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "merge": self.merge.tolist(),
            "threshold": self.threshold,
            "cost": self.cost.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DriftReference:
        if data.get("version") != _REFERENCE_VERSION:
            raise DataError(f"unknown drift reference version {data.get('version')!r}")
        try:
            return cls(
                feature_names=tuple(str(n) for n in data["feature_names"]),
                edges=np.asarray(data["edges"], dtype=np.float64),
                counts=np.asarray(data["counts"], dtype=np.float64),
                merge=np.asarray(data["merge"], dtype=np.int64),
                threshold=float(data["threshold"]),
                cost=ReleaseCost.from_json(data["cost"]),
            )
        except (KeyError, TypeError, ValueError) as bad:
            raise DataError(f"malformed drift reference: {bad}") from None

    def save(self, run_dir: Path) -> Path:
        path = run_dir / REFERENCE_FILENAME
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, run_dir: Path) -> DriftReference:
        path = Path(run_dir) / REFERENCE_FILENAME
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: the run kept no drift reference (train with --drift)"
            )
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def _histograms(
    final: FinalModel, edges: np.ndarray, query_round: int, split: str
) -> SecureStatisticResult:
    config = final.config
    content = RecordDict({k: v for k, v in final.instruction.items() if k != protocol.ARRAYS})
    return collect_secure_statistic(
        final.send,
        final.nodes,
        StatisticKind.DRIFT,
        instruction=content,
        vector_length=edges.shape[0] * (edges.shape[1] + 1),
        query_round=query_round,
        target_epsilon=config.trust.drift_epsilon,
        noise=config.trust.noise,
        options={"edges": edges, "split": split},
        identities=final.identities,
    )


def drift_reference(final: FinalModel) -> DriftReference:
    """Fix the bins from the scaler's schema and release the training-time histograms."""
    config = final.config
    schema = schema_for(config.contract)
    edges = bin_edges(schema.standardize, config.trust.drift_bins)
    result = _histograms(final, edges, 0, "train")
    counts = result.values.reshape(edges.shape[0], -1)
    return DriftReference(
        feature_names=schema.feature_names,
        edges=edges,
        counts=counts,
        merge=merge_bins(counts),
        threshold=config.trust.drift_threshold,
        cost=release_cost(result, final.silo_name),
    )


def monitor_drift(
    final: FinalModel,
    reference: DriftReference,
    query_round: int,
    split: str = "train",
    threshold: float | None = None,
) -> DriftResult:
    """One monitoring round: current histograms against the reference, alerts per feature."""
    if query_round < 1:
        raise DataError("monitoring rounds are numbered from 1 (round 0 is the reference)")
    limit = reference.threshold if threshold is None else threshold
    result = _histograms(final, reference.edges, query_round, split)
    current = result.values.reshape(reference.counts.shape)
    scores = drift_scores(
        reference.feature_names, reference.counts, current, limit, reference.merge
    )
    return DriftResult(
        threshold=limit,
        metric="psi",
        features=tuple(FeatureDrift(s.feature, s.psi, s.js, s.alert) for s in scores),
        cost=release_cost(result, final.silo_name),
        label=f"monitor round {query_round}",
    )


# --------------------------------------------------------------------------- attributions


def global_attributions(final: FinalModel) -> AttributionResult:
    """Mean clipped Integrated-Gradients attribution per feature of the final model."""
    schema = schema_for(final.config.contract)
    trust = final.config.trust
    result = collect_secure_statistic(
        final.send,
        final.nodes,
        StatisticKind.ATTRIBUTION,
        instruction=final.instruction,
        # [Σ|c|, Σc, n] per silo (7b: fedguard.trust.explanations / core.trust_results)
        vector_length=attribution_vector_length(schema.num_features),
        query_round=0,
        target_epsilon=trust.explain_epsilon,
        noise=trust.noise,
        options={
            "attribution-clip-norm": trust.explain_clip_norm,
            "attribution-steps": trust.explain_steps,
            "attribution-split": "train",
        },
        identities=final.identities,
    )
    return attribution_from_sum(
        result.values,
        schema.feature_names,
        model="global",
        clip_norm=trust.explain_clip_norm,
        steps=trust.explain_steps,
        output="log-odds of class 1" if schema.is_binary else "log-probability of the prediction",
        cost=release_cost(result, final.silo_name),
    )


# --------------------------------------------------------------------------- the phase


def _drift_result(reference: DriftReference) -> DriftResult:
    """The reference against itself: zero drift; records the reference's cost."""
    scores = drift_scores(
        reference.feature_names,
        reference.counts,
        reference.counts,
        reference.threshold,
        reference.merge,
    )
    return DriftResult(
        threshold=reference.threshold,
        metric="psi",
        features=tuple(FeatureDrift(s.feature, s.psi, s.js, s.alert) for s in scores),
        cost=reference.cost,
        label="reference",
    )


def trust_phase(final: FinalModel) -> TrustResults | None:
    """The round loop's post-training phase: audit, drift reference and attributions.

    Writes ``trust.json``; nothing when the run's trust layer is off. A part that
    cannot be computed (too few silos answer, a data set without the attribute) is
    logged and left out; the others go on.
    """
    trust = final.config.trust
    if not trust.enabled:
        return None
    run_dir = final.run_dir
    extra: dict[str, Any] = {}
    fairness: FairnessResult | None = None
    drift: list[DriftResult] = []
    attributions: list[AttributionResult] = []
    if trust.fairness_attribute is not None:
        audited = _release(run_dir, "fairness", lambda: fairness_audit(final))
        if audited is not None:
            fairness, extra["fairness_calibration"] = audited
            append_log(run_dir, {"release": "fairness", "result": fairness.to_json()})
    if trust.drift:
        reference = _release(run_dir, "drift-reference", lambda: drift_reference(final))
        if reference is not None:
            reference.save(run_dir)
            drift.append(_drift_result(reference))
            append_log(run_dir, {"release": "drift-reference", "cost": reference.cost.to_json()})
    if trust.explain:
        attribution = _release(run_dir, "attribution", lambda: global_attributions(final))
        if attribution is not None:
            attributions.append(attribution)
            append_log(run_dir, {"release": "attribution", "result": attribution.to_json()})
    results = TrustResults(fairness=fairness, drift=tuple(drift), attributions=tuple(attributions))
    path = write_trust_results(run_dir, results)
    if extra:
        # Calibration per group is kept beside the sections the reports read.
        data = json.loads(path.read_text(encoding="utf-8"))
        atomic_write_json(path, {**data, **extra})
    return results


def _release(run_dir: Path, name: str, compute: Callable[[], _Released]) -> _Released | None:
    """``compute()``, or None with the failure logged and kept in the trust log."""
    try:
        return compute()
    except (SecAggAbort, FedguardError) as failed:
        log.error("%s release failed: %s", name, failed)
        append_log(run_dir, {"release": name, "error": str(failed)})
        return None


def record_monitoring(run_dir: Path, result: DriftResult) -> None:
    """Append a monitoring round to the trust log and to ``trust.json``'s drift list."""
    append_log(run_dir, {"release": "drift-monitor", "result": result.to_json()})
    path = run_dir / "trust.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if data is not None:
        data["drift"] = [*data.get("drift", []), result.to_json()]
        atomic_write_json(path, data)


def alerts_summary(result: DriftResult) -> str:
    worst = max(result.features, key=lambda f: f.psi)
    alerted = ", ".join(result.alerts) or "none"
    return (
        f"{result.label}: alerts {alerted} (max PSI {worst.psi:.4f} on {worst.feature}, "
        f"threshold {result.threshold:g}, ε {result.cost.epsilon:.3g} per silo)"
    )
