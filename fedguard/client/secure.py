"""The silo side of SecAgg+ over Flower messages (five ``train.secagg_*`` stages).

Stage 0 (``secagg_setup``) carries the usual training instruction: the silo
checks its budget and trains (charging nothing yet), turns its update
Δ = new − global into a fixed-point vector (:class:`FixedPointEncoder`: clipped
values counted, stochastic rounding, integer weight) and answers with its key
advertisement only. The encoded vector and the round's secrets stay in the
node's ``context.state``, which Flower keeps on the silo between messages (the
ClientApp object itself is rebuilt per message). Later stages load that state,
run one :class:`ClientRound` step and store it again; after unmasking it is
deleted. The masked input (stage 2) is the release: the silo charges its ledger
and logs the charge right before it answers that stage, and reports the ε after
the charge in that reply (``epsilon-spent``); a round that aborts earlier costs
nothing (:mod:`fedguard.client.release`).

With central DP on, the silo clips its Δ to the central L2 bound before
encoding (the server adds the Gaussian noise to the unmasked sum) and every
weight is 1 (DP-FedAvg needs a sensitivity that does not depend on silo size).
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedguard.client.policy import PolicyRefusalError, RefusalReason
from fedguard.client.release import PendingCharge, charge_release, spend_metrics
from fedguard.client.secagg_instances import InstanceKey, InstanceStatus, SecAggInstances
from fedguard.client.secure_identity import authenticate_setup
from fedguard.client.silo import SiloSettings
from fedguard.core.errors import FedguardError, ProtocolError
from fedguard.core.serialization import ModelWeights, flatten_weights
from fedguard.privacy.secagg import (
    ClientRound,
    ConsistencyRequest,
    FixedPointEncoder,
    MaskedInputRequest,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
)
from fedguard.privacy.secagg.errors import SecAggError
from fedguard.privacy.secagg.transcript import Stage
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.secagg import payload, secagg_record

log = logging.getLogger(__name__)

STATE_KEY = "fedguard.secagg"


def clip_to_norm(vector: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector if norm <= bound else vector * (bound / norm)


class SecureAggregationClient:
    """One silo's SecAgg+ stages, checked against the silo's own policy and state.

    Every stage runs inside :meth:`_stage`: a stage that raises (a policy refusal, a
    malformed or inconsistent request, a failed signature) erases the round's
    secrets and encoded update from ``context.state`` and marks the silo's
    persistent commitment aborted, so neither a corrected retry of the stage nor a
    fresh setup for the same (run, round, purpose) is ever answered.
    """

    def __init__(self, context: Context, settings: SiloSettings) -> None:
        self.context = context
        self.settings = settings
        self.silo_id = settings.silo_id
        self.instances = SecAggInstances(settings.state_dir)

    def _reply(
        self, message: Message, data: bytes, metrics: dict[str, float] | None = None
    ) -> Message:
        records: dict[str, Any] = {
            protocol.STATUS: protocol.status_record(ReplyStatus.OK, "", self.silo_id),
            protocol.SECAGG: secagg_record(data),
        }
        if metrics is not None:
            records[protocol.METRICS] = MetricRecord(dict(metrics))
        return Message(RecordDict(records), reply_to=message)

    def _save(
        self,
        state: ClientRound,
        encoded: np.ndarray | None = None,
        instance: InstanceKey | None = None,
        metrics: dict[str, float] | None = None,
        pending: PendingCharge | None = None,
    ) -> None:
        record = ConfigRecord({"round": state.to_bytes()})
        previous = self.context.state.config_records.get(STATE_KEY)
        for name, value in (
            ("encoded", None if encoded is None else encoded.astype("<u4").tobytes()),
            ("instance", None if instance is None else _instance_text(instance)),
            ("metrics", None if metrics is None else json.dumps(metrics, sort_keys=True)),
            ("charge", None if pending is None else pending.to_text()),
        ):
            if value is not None:
                record[name] = value
            elif previous is not None and name in previous:
                record[name] = previous[name]
        self.context.state.config_records[STATE_KEY] = record

    def _load(self) -> tuple[ClientRound, np.ndarray]:
        record = self.context.state.config_records.get(STATE_KEY)
        if record is None:
            raise ProtocolError("no SecAgg round in progress on this silo")
        round_bytes, encoded = record["round"], record.get("encoded", b"")
        if not isinstance(round_bytes, bytes) or not isinstance(encoded, bytes):
            raise ProtocolError("the stored SecAgg state is corrupt")
        return ClientRound.from_bytes(round_bytes), np.frombuffer(encoded, dtype="<u4").copy()

    def _stored_instance(self) -> InstanceKey | None:
        record = self.context.state.config_records.get(STATE_KEY)
        text = None if record is None else record.get("instance")
        return _instance_from_text(text) if isinstance(text, str) else None

    def _erase(self, instance: InstanceKey | None, reason: str) -> None:
        """Forget the round's secrets (persisted state too) and close the commitment."""
        instance = instance or self._stored_instance()
        self.context.state.config_records.pop(STATE_KEY, None)
        if instance is not None:
            self.instances.close(instance, InstanceStatus.ABORTED, reason)

    @contextmanager
    def _stage(self, instance: InstanceKey | None = None) -> Iterator[None]:
        try:
            yield
        except Exception as failed:
            try:
                self._erase(instance, f"{type(failed).__name__}: {failed}")
            except FedguardError as also:
                log.error("silo %s could not close its SecAgg commitment: %s", self.silo_id, also)
            if isinstance(failed, SecAggError):
                # The protocol refused (bad signature, equivocation, a weaker config):
                # a policy decision of the silo, not a malfunction.
                raise PolicyRefusalError(RefusalReason.SECAGG_STAGE, str(failed)) from failed
            raise

    def setup(
        self,
        message: Message,
        train: Callable[[Message], tuple[np.ndarray, dict[str, float], PendingCharge | None]],
        instance: InstanceKey,
        clip: bool = True,
    ) -> Message:
        """Stage 0: check, commit, train, encode, keep the secrets, advertise keys.

        ``instance`` names what is aggregated (run, round, purpose); the silo joins
        at most one SecAgg instance for it (:mod:`fedguard.client.secagg_instances`).
        ``clip`` False plays a silo that ignores the requested L2 clip (simulated
        Byzantine silos); the server's group-norm check is what catches it.
        """
        setup = SetupRequest.from_bytes(payload(message))
        options = message.content.config_records[protocol.SECAGG]
        clip_norm = _number(options, "clip-norm")
        weight_unit = int(_number(options, "weight-unit"))
        # The silo's own floor on the round's parameters, before anything is trained.
        self.settings.policy.check_secagg(setup.config)
        identity_key, identity_registry = self._identity(message, setup)
        commitment = self.instances.commit(instance, setup.digest(), setup.node_ids)
        if commitment.repeat:
            return self._repeat_setup(message, setup, instance)
        with self._stage(instance):
            # A new instance replaces any unfinished one (its secrets are dropped).
            stale = self._stored_instance()
            self.context.state.config_records.pop(STATE_KEY, None)
            if stale is not None and stale != instance:
                self.instances.close(stale, InstanceStatus.ABORTED, "superseded by a new round")
            # Trained (or computed) here, charged only when the masked input leaves.
            delta, metrics, pending = train(message)
            if clip_norm > 0 and clip:
                delta = clip_to_norm(delta, clip_norm)
            examples = int(metrics["num-examples"])
            weight = 1 if weight_unit <= 0 else math.ceil(examples / weight_unit)
            encoded = FixedPointEncoder(setup.config).encode(delta, weight)
            if encoded.length != setup.vector_length:
                raise ProtocolError(
                    f"the round expects vectors of {setup.vector_length} values, "
                    f"this silo's update encodes to {encoded.length}"
                )
            state, advertisement = ClientRound.start(
                setup,
                self.context.node_id,
                identity_key=identity_key,
                identity_registry=identity_registry,
            )
            # No count of clipped values: it is a function of the silo's update.
            metrics = {**metrics, "secagg-weight": weight}
            self._save(state, encoded.values, instance, metrics, pending)
            return self._reply(message, advertisement.to_bytes(), metrics)

    def _identity(
        self, message: Message, setup: SetupRequest
    ) -> tuple[bytes | None, dict[int, bytes] | None]:
        """This silo's identity key and the cohort's verified identity keys.

        The roster, the silo list and the round binding are checked against the
        silo's own settings (:func:`fedguard.client.secure_identity.authenticate_setup`);
        any problem is a ``secagg-roster`` refusal, before training.
        """
        options = message.content.config_records[protocol.SECAGG]
        verified = authenticate_setup(setup, options, self.settings, self.context.node_id)
        return verified.key, dict(verified.registry)

    def _repeat_setup(
        self, message: Message, setup: SetupRequest, instance: InstanceKey
    ) -> Message:
        """A redelivered setup of the open instance: the same advert, nothing new."""
        record = self.context.state.config_records.get(STATE_KEY)
        with self._stage(instance):
            if record is None or self._stored_instance() != instance:
                raise PolicyRefusalError(
                    RefusalReason.SECAGG_SECOND_INSTANCE,
                    f"the setup of {instance} is repeated but this silo no longer holds "
                    "that round's state: it does not start it again",
                )
            state, _ = self._load()
            if state.stage is not Stage.SHARE_KEYS or state.setup.digest() != setup.digest():
                raise PolicyRefusalError(
                    RefusalReason.SECAGG_SECOND_INSTANCE,
                    f"the setup of {instance} is repeated after the round moved on",
                )
            metrics = json.loads(str(record.get("metrics", "{}")))
            return self._reply(message, state.advertisement.to_bytes(), metrics)

    def _check_survivors(self, survivors: int) -> None:
        """The sum this silo helps reveal covers at least its minimum cohort.

        The cohort is checked at setup; a server that then claims dropouts could
        otherwise shrink the revealed sum below it (down to SecAgg+'s t + 1).
        """
        if survivors < self.settings.policy.min_cohort:
            raise PolicyRefusalError(
                RefusalReason.COHORT_TOO_SMALL,
                f"the server would reveal a sum over {survivors} surviving silos; this "
                f"silo's minimum cohort is {self.settings.policy.min_cohort}",
            )

    def share_keys(self, message: Message) -> Message:
        with self._stage():
            state, _ = self._load()
            reply = state.share_keys(ShareKeysRequest.from_bytes(payload(message)))
            self._save(state)
            return self._reply(message, reply.to_bytes())

    def _pending(self) -> PendingCharge | None:
        record = self.context.state.config_records.get(STATE_KEY)
        text = None if record is None else record.get("charge")
        return PendingCharge.from_text(text) if isinstance(text, str) else None

    def mask(self, message: Message) -> Message:
        """Stage 2: the release. The charge is committed first (ledger, silo log)."""
        with self._stage():
            state, encoded = self._load()
            request = MaskedInputRequest.from_bytes(payload(message))
            pending = self._pending()
            reply = state.mask_input(request, encoded)  # may still fail: nothing sent yet
            metrics: dict[str, float] | None = None
            if pending is not None:
                # The last step before the masked input leaves; the budget is checked
                # again (it may have been spent since setup): refused, nothing leaves.
                entry = charge_release(self.settings, pending)
                metrics = spend_metrics(self.settings, entry)
            self._save(state)
            return self._reply(message, reply.to_bytes(), metrics)

    def consistency(self, message: Message) -> Message:
        with self._stage():
            state, _ = self._load()
            request = ConsistencyRequest.from_bytes(payload(message))
            self._check_survivors(len(request.survivors))
            reply = state.sign_survivors(request)
            self._save(state)
            return self._reply(message, reply.to_bytes())

    def unmask(self, message: Message) -> Message:
        with self._stage():
            instance = self._stored_instance()
            state, _ = self._load()
            unmask_request = UnmaskRequest.from_bytes(payload(message))
            self._check_survivors(len(unmask_request.survivors))
            reply = state.unmask(unmask_request)
            # This round's secrets and encoded update are done with.
            self.context.state.config_records.pop(STATE_KEY, None)
            if instance is not None:
                self.instances.close(instance, InstanceStatus.COMPLETED)
            return self._reply(message, reply.to_bytes())


def _instance_text(instance: InstanceKey) -> str:
    return json.dumps([instance.run_id, instance.round, instance.purpose])


def _instance_from_text(text: str) -> InstanceKey | None:
    try:
        run_id, round_number, purpose = json.loads(text)
        return InstanceKey(str(run_id), int(round_number), str(purpose))
    except (ValueError, TypeError):
        return None


def _number(record: ConfigRecord, key: str) -> float:
    value = record.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"SecAgg option {key!r} must be a finite number, got {value!r}")
    return float(value)


def clip_update(global_weights: ModelWeights, weights: ModelWeights, bound: float) -> ModelWeights:
    """``weights`` with Δ = weights − global clipped to L2 norm ``bound`` (0: unchanged)."""
    if bound <= 0:
        return weights
    delta = update_delta(global_weights, weights)
    norm = float(np.linalg.norm(delta))
    if norm <= bound:
        return weights
    scale = bound / norm
    return OrderedDict(
        (name, (global_weights[name] + (value - global_weights[name]) * scale).astype(value.dtype))
        for name, value in weights.items()
    )


def update_delta(
    global_weights: dict[str, np.ndarray], weights: dict[str, np.ndarray]
) -> np.ndarray:
    delta: np.ndarray = flatten_weights(weights) - flatten_weights(global_weights)
    return delta
