"""Typed errors of fedguard's secure aggregation (SecAgg+).

Three families, so that a caller can tell them apart without reading messages:

* :class:`SecAggConfigError` — a configuration that is unsafe or cannot work
  (for example an overflow budget that does not hold); raised at construction.
* :class:`SecAggAbort` — the round cannot finish without weakening privacy
  (fewer than ``t`` live neighbours somewhere). Nothing was or will be revealed
  beyond what the protocol allows; the caller records the round as failed and
  starts the next one.
* :class:`SecAggProtocolError` — a message is malformed, out of order, from
  another round, or proves the server (or a peer) misbehaved: a bad signature, a
  tampered advertisement, a share that fails AES-GCM authentication, or an
  unmasking request that names one node both dropped and alive. A client that
  raises one of these reveals nothing for the round.
"""

from __future__ import annotations

from fedguard.core.errors import ConfigError, FedguardError


class SecAggError(FedguardError):
    """Base class of every secure-aggregation error."""


class SecAggConfigError(SecAggError, ConfigError):
    """A secure-aggregation setting is missing, unsafe or inconsistent."""


class EncodingError(SecAggError, ValueError):
    """An input cannot be encoded (non-finite values, wrong shape, bad weight)."""


class SecAggAbort(SecAggError):  # noqa: N818 (the name the issue and callers use)
    """The round is aborted: continuing would need fewer than ``t`` shares somewhere.

    ``stage`` names the protocol stage (a :class:`~fedguard.privacy.secagg.transcript.Stage`
    value) at which the abort happened.
    """

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"secure aggregation aborted at stage {stage!r}: {reason}")
        self.stage = stage
        self.reason = reason


class BelowThresholdError(SecAggAbort):
    """Fewer than ``t`` live neighbours, shares or signatures where ``t`` are needed."""


class SecAggProtocolError(SecAggError):
    """A message breaks the protocol; the receiver refuses to go on."""


class MalformedMessageError(SecAggProtocolError):
    """A payload cannot be decoded or has fields of the wrong size or type."""


class StageOrderError(SecAggProtocolError):
    """A message arrived for a stage other than the one the state is in (or a replay)."""


class RoundMismatchError(SecAggProtocolError):
    """A message carries another round's id (a replay from another round)."""


class IdentityError(SecAggProtocolError):
    """Identity keys are required but missing, unknown or inconsistent."""


class SignatureError(SecAggProtocolError):
    """An Ed25519 signature does not verify."""


class AdvertisementError(SecAggProtocolError):
    """A relayed key advertisement is tampered with, duplicated or from a non-neighbour."""


class ShareDecryptionError(SecAggProtocolError):
    """An encrypted share fails AES-GCM authentication (wrong round, sender or receiver)."""


class ConsistencyError(SecAggProtocolError):
    """The unmasking request contradicts the signed survivor list.

    Raised when a node is listed both dropped and alive, when the survivor list
    differs from the one the client signed, or when a relayed consistency
    signature comes from a node outside the survivor list.
    """


class ReconstructionError(SecAggProtocolError):
    """Shares reconstruct a secret that does not match its public commitment."""
