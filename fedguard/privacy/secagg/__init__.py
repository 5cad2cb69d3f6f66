"""Secure aggregation for fedguard: SecAgg+ with real cryptography, no transport.

The server learns only the sum of the surviving clients' encoded updates, never
one client's update, with clients dropping out at any stage (Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017;
Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020). Modules:

* :mod:`.config` — :class:`SecAggConfig` (n, k, t, fixed-point budget), validated.
* :mod:`.analysis` — choosing k and t from σ, η, dropout and corruption rates.
* :mod:`.encoding` — clipping (counted), stochastic rounding, weights, exact decoding.
* :mod:`.transcript` — the :class:`Stage` names and what both sides derive from
  the setup (mask seeds, share keys and AAD, commitments, the neighbour graph).
* :mod:`.client_round` / :mod:`.server_round` — the :class:`ClientRound` and
  :class:`ServerRound` stages; :mod:`.driver` — the in-memory driver :func:`run_round`.
* :mod:`.messages` — the payloads, with ``to_bytes`` / ``from_bytes``.
* :mod:`.crypto`, :mod:`.shamir`, :mod:`.graph` — X25519, Ed25519, HKDF, AES-GCM,
  AES-CTR masks; Shamir sharing; the neighbour graph.
* :mod:`.roster` — the consortium's signed roster of silo identity keys (the PKI
  that authenticates every key advertisement); not imported here.
"""

from __future__ import annotations

from fedguard.privacy.secagg.client_round import ClientRound
from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.driver import RoundOutcome, run_round
from fedguard.privacy.secagg.encoding import (
    DecodedSum,
    EncodedInput,
    FixedPointEncoder,
    StochasticRounder,
)
from fedguard.privacy.secagg.errors import (
    BelowThresholdError,
    SecAggAbort,
    SecAggConfigError,
    SecAggError,
    SecAggProtocolError,
)
from fedguard.privacy.secagg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    SetupRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from fedguard.privacy.secagg.server_round import AggregateResult, ServerRound
from fedguard.privacy.secagg.transcript import Stage

__all__ = [
    "AggregateResult",
    "BelowThresholdError",
    "ClientRound",
    "ConsistencyRequest",
    "ConsistencySignature",
    "DecodedSum",
    "EncodedInput",
    "FixedPointEncoder",
    "KeyAdvertisement",
    "MaskedInput",
    "MaskedInputRequest",
    "RoundOutcome",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggConfigError",
    "SecAggError",
    "SecAggProtocolError",
    "ServerRound",
    "SetupRequest",
    "ShareKeysRequest",
    "ShareKeysResponse",
    "Stage",
    "StochasticRounder",
    "UnmaskRequest",
    "UnmaskResponse",
    "run_round",
]
