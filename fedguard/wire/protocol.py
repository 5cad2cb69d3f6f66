"""fedguard's message protocol on Flower's Message API.

The server sends three kinds of instruction; each silo answers with a reply whose
``status`` record says ``ok``, ``refused`` (a policy decision of the silo, such as
an exhausted privacy budget) or ``error`` (the silo could not do it), with a reason.

================  =====================  ==========================================
message type      instruction content    reply content
================  =====================  ==========================================
``query.feature_statistics``  ``config``  ``statistics`` (count, total, total_squares)
``train``         ``config``, ``arrays``, ``scaler``  ``arrays``, ``metrics``
``evaluate``      ``config``, ``arrays``, ``scaler``  ``metrics`` [, ``histograms``]
``train.secagg_setup``  as ``train`` + ``secagg``   ``secagg`` (key advertisement), ``metrics``
``train.secagg_*``  ``secagg`` (stage request)  ``secagg`` (stage reply)
================  =====================  ==========================================

Every reply also carries ``status``. Instructions are parsed into the frozen,
validated :class:`RoundInstructions` once, at the silo's boundary; a malformed
instruction raises :class:`~fedguard.core.errors.ProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from flwr.app import ConfigRecord, Message, RecordDict

from fedguard.core.config import (
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    ModelFamily,
    ModelSpec,
    NoiseSource,
    OptimizerKind,
)
from fedguard.core.errors import ConfigError, ProtocolError, UnknownDatasetError

# 2: the data contract (name, hash) replaced the data set name; the model family,
# factory and architecture hash joined.
PROTOCOL_VERSION = 2

FEATURE_STATISTICS = "query.feature_statistics"
TRAIN = "train"
EVALUATE = "evaluate"

# SecAgg+ stages (Bonawitz et al. 2017, rounds 0-4); see fedguard.server.secure_round.
SECAGG_SETUP = "train.secagg_setup"
SECAGG_SHARE = "train.secagg_share"
SECAGG_MASK = "train.secagg_mask"
SECAGG_CONSISTENCY = "train.secagg_consistency"
SECAGG_UNMASK = "train.secagg_unmask"

CONFIG = "config"
SECAGG = "secagg"
ARRAYS = "arrays"
SCALER = "scaler"
METRICS = "metrics"
STATUS = "status"
STATISTICS = "statistics"
HISTOGRAMS = "histograms"


class ReplyStatus(StrEnum):
    OK = "ok"
    REFUSED = "refused"
    ERROR = "error"


@dataclass(frozen=True)
class RoundInstructions:
    """What the server asks of a silo in one round."""

    run_id: str
    round: int
    planned_rounds: int
    seed: int
    # The run's data contract: its name and SHA-256; a silo under another refuses.
    contract_name: str
    contract_hash: str
    model: ModelSpec
    training: LocalTrainingConfig
    local_dp: LocalDPConfig
    # ε of each trust-layer release the run plans after training (fairness audit,
    # drift reference and monitoring, attributions): silos keep budget for them.
    planned_releases: tuple[float, ...] = ()
    # L2 bound each silo clips its update Δ = new − global to (0: none). Robustness,
    # not privacy: the server checks plain updates and decoded sums against it.
    update_clip_norm: float = 0.0
    # SHA-256 of the model's architecture (fedguard.core.models.architecture_hash): a
    # silo whose own model hashes otherwise refuses; "" is refused too.
    model_hash: str = ""

    def __post_init__(self) -> None:
        if not (self.update_clip_norm >= 0 and self.update_clip_norm < float("inf")):
            raise ProtocolError(
                f"update clip norm must be finite and >= 0, got {self.update_clip_norm!r}"
            )
        if not self.run_id:
            raise ProtocolError("run id is empty")
        if not self.contract_name or len(self.contract_hash) != 64:
            raise ProtocolError(
                f"an instruction names its data contract and its SHA-256, got "
                f"{self.contract_name!r} {self.contract_hash!r}"
            )
        if not all(isinstance(e, float) and 0 < e < float("inf") for e in self.planned_releases):
            raise ProtocolError(f"planned releases must be ε > 0, got {self.planned_releases!r}")
        if self.round < 0 or self.planned_rounds < 1:
            raise ProtocolError(
                f"bad round numbers: round {self.round} of {self.planned_rounds} planned"
            )

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "protocol-version": PROTOCOL_VERSION,
                "run-id": self.run_id,
                "round": self.round,
                "planned-rounds": self.planned_rounds,
                "seed": self.seed,
                "contract": self.contract_name,
                "contract-hash": self.contract_hash,
                "hidden": list(self.model.hidden),
                "model-family": self.model.family.value,
                "model-factory": self.model.factory,
                "model-hash": self.model_hash,
                "local-epochs": self.training.local_epochs,
                "batch-size": self.training.batch_size,
                "learning-rate": self.training.learning_rate,
                "optimizer": self.training.optimizer.value,
                "momentum": self.training.momentum,
                "dp-enabled": self.local_dp.enabled,
                "max-grad-norm": self.local_dp.max_grad_norm,
                "grad-sample-mode": self.local_dp.grad_sample_mode.value,
                "noise-source": self.local_dp.noise_source.value,
                "max-noise-multiplier": self.local_dp.max_noise_multiplier,
                "planned-releases": [float(e) for e in self.planned_releases],
                "update-clip-norm": float(self.update_clip_norm),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundInstructions:
        try:
            version = _int(record, "protocol-version")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {version!r}; this silo speaks {PROTOCOL_VERSION}"
                )
            hidden = record["hidden"]
            if not isinstance(hidden, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hidden
            ):
                raise ProtocolError("'hidden' must be a list of integer layer sizes")
            return cls(
                run_id=_str(record, "run-id"),
                round=_int(record, "round"),
                planned_rounds=_int(record, "planned-rounds"),
                seed=_int(record, "seed"),
                contract_name=_str(record, "contract"),
                contract_hash=_str(record, "contract-hash"),
                model=ModelSpec(
                    hidden=tuple(int(h) for h in hidden),
                    family=ModelFamily(_str(record, "model-family")),
                    factory=_str(record, "model-factory"),
                ),
                model_hash=_str(record, "model-hash"),
                training=LocalTrainingConfig(
                    local_epochs=_int(record, "local-epochs"),
                    batch_size=_int(record, "batch-size"),
                    learning_rate=_float(record, "learning-rate"),
                    optimizer=OptimizerKind(_str(record, "optimizer")),
                    momentum=_float(record, "momentum"),
                ),
                local_dp=LocalDPConfig(
                    enabled=_bool(record, "dp-enabled"),
                    max_grad_norm=_float(record, "max-grad-norm"),
                    grad_sample_mode=GradSampleMode(_str(record, "grad-sample-mode")),
                    noise_source=NoiseSource(_str(record, "noise-source")),
                    max_noise_multiplier=_float(record, "max-noise-multiplier"),
                ),
                planned_releases=_floats(record, "planned-releases"),
                update_clip_norm=(
                    _float(record, "update-clip-norm") if "update-clip-norm" in record else 0.0
                ),
            )
        except KeyError as missing:
            raise ProtocolError(f"instruction lacks field {missing}") from None
        except UnknownDatasetError:
            raise
        except (ConfigError, ValueError) as bad:
            raise ProtocolError(f"malformed instruction: {bad}") from None


def _int(record: ConfigRecord, key: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _float(record: ConfigRecord, key: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"field {key!r} must be a number, got {value!r}")
    return float(value)


def _floats(record: ConfigRecord, key: str) -> tuple[float, ...]:
    value = record.get(key, [])  # optional: instructions without trust releases omit it
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ProtocolError(f"field {key!r} must be a list of numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _str(record: ConfigRecord, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} must be a string, got {value!r}")
    return value


def _bool(record: ConfigRecord, key: str) -> bool:
    value = record[key]
    if not isinstance(value, bool):
        raise ProtocolError(f"field {key!r} must be true or false, got {value!r}")
    return value


def status_record(
    status: ReplyStatus, reason: str = "", silo_id: str = "", refusal: str = ""
) -> ConfigRecord:
    """``refusal``: the silo policy's reason code of a ``refused`` reply (else empty)."""
    return ConfigRecord(
        {"status": status.value, "reason": reason, "silo-id": silo_id, "refusal": refusal}
    )


def reply_status(reply: Message) -> tuple[ReplyStatus, str]:
    """The status of a silo's reply; a Flower error or a missing status is ``ERROR``."""
    if reply.has_error():
        return ReplyStatus.ERROR, f"Flower error {reply.error.code}: {reply.error.reason}"
    content: RecordDict = reply.content
    if STATUS not in content.config_records:
        return ReplyStatus.ERROR, "reply has no status record"
    record = content.config_records[STATUS]
    try:
        status = ReplyStatus(str(record["status"]))
    except (KeyError, ValueError):
        return ReplyStatus.ERROR, f"reply has an unknown status {record.get('status')!r}"
    return status, str(record.get("reason", ""))


def reply_metrics(reply: Message) -> dict[str, float]:
    """A reply's numeric metrics (none for an error reply or one without metrics)."""
    if not reply.has_content() or METRICS not in reply.content.metric_records:
        return {}
    return {
        k: float(v)
        for k, v in reply.content.metric_records[METRICS].items()
        if isinstance(v, (int, float))
    }
