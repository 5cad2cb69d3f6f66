"""The server's side of a SecAgg+ round: :class:`ServerRound` and its result.

The protocol and its transcript are described in :mod:`.transcript`. The server
never stores an individual masked or unmasked vector, only their running sum.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import (
    MaskExpander,
    ed25519_verify,
    random_bytes,
    x25519_private,
    x25519_public,
)
from fedguard.privacy.secagg.errors import (
    BelowThresholdError,
    IdentityError,
    MalformedMessageError,
    ReconstructionError,
    StageOrderError,
)
from fedguard.privacy.secagg.graph import NeighbourGraph
from fedguard.privacy.secagg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    SetupRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from fedguard.privacy.secagg.shamir import combine, elements_to_secret
from fedguard.privacy.secagg.transcript import (
    Stage,
    consistency_message,
    pairwise_mask_seed,
    round_graph,
    seed_commitment,
)

__all__ = ["AggregateResult", "ServerRound"]


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The unmasked sum (uint32, exact mod 2^32) and who it is the sum of."""

    total: np.ndarray
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]
    rejected: dict[int, str]


@dataclass
class ServerRound:
    """The server's state for one round. It never stores an individual masked or
    unmasked vector: masked inputs are added to ``masked_sum`` on arrival, and the
    only other array is the final ``total`` (a sum over >= t + 1 clients).

    Build with :meth:`begin`, send :meth:`setup_requests`, then feed each stage's
    replies (keyed by the sender's node id; a missing node is a dropout) to the
    ``receive_*`` methods in order; each returns the next stage's requests, the
    last one the :class:`AggregateResult`. A reply that fails validation is not
    used (its sender counts as dropped; the reason is kept in ``rejected``). A
    threshold failure raises :class:`BelowThresholdError` (a :class:`SecAggAbort`)
    before any further secret is requested.
    """

    setup: SetupRequest
    identity_keys: dict[int, bytes] = field(repr=False)
    stage: Stage = Stage.ADVERTISE_KEYS
    advertisements: dict[int, KeyAdvertisement] = field(default_factory=dict, repr=False)
    share_senders: tuple[int, ...] = ()
    masked_with: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)
    holders: dict[int, frozenset[int]] = field(default_factory=dict, repr=False)
    masked_sum: np.ndarray | None = field(default=None, repr=False)
    contributors: tuple[int, ...] = ()
    signers: tuple[int, ...] = ()
    signatures: dict[int, ConsistencySignature] = field(default_factory=dict, repr=False)
    total: np.ndarray | None = field(default=None, repr=False)
    rejected: dict[int, str] = field(default_factory=dict)
    aborted: str | None = None
    _digest: bytes = field(init=False, repr=False)
    _graph: NeighbourGraph = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.setup, SetupRequest):
            raise MalformedMessageError("setup must be a SetupRequest")
        if self.setup.config.require_identity:
            missing = [n for n in self.setup.node_ids if n not in self.identity_keys]
            if missing:
                raise IdentityError(f"no registered identity key for node(s) {missing[:5]}")
        self._digest = self.setup.digest()
        self._graph = round_graph(self.setup)

    @classmethod
    def begin(
        cls,
        config: SecAggConfig,
        node_ids: Sequence[int],
        vector_length: int,
        *,
        round_id: bytes | None = None,
        identity_registry: Mapping[int, bytes] | None = None,
    ) -> ServerRound:
        """A new round over ``node_ids`` (exactly ``config.num_clients`` of them).

        ``round_id``: 8–64 bytes, unique per round (default: 16 random bytes). It is
        public; everything of the round is bound to it and to the setup digest.
        """
        setup = SetupRequest(
            round_id if round_id is not None else random_bytes(16),
            config,
            tuple(sorted(node_ids)),
            vector_length,
        )
        registry = (
            {n: bytes(key) for n, key in identity_registry.items()}
            if identity_registry is not None
            else {}
        )
        return cls(setup=setup, identity_keys=registry)

    @property
    def round_id(self) -> bytes:
        return self.setup.round_id

    @property
    def config(self) -> SecAggConfig:
        return self.setup.config

    @property
    def graph(self) -> NeighbourGraph:
        return self._graph

    @property
    def dropped(self) -> tuple[int, ...]:
        """Nodes that shared keys but sent no masked input (their masks get removed)."""
        return tuple(sorted(set(self.share_senders) - set(self.contributors)))

    # ------------------------------------------------------------------ helpers

    def _expect(self, stage: Stage) -> None:
        if self.aborted is not None:
            raise StageOrderError(f"the round was aborted: {self.aborted}")
        if self.stage is not stage:
            raise StageOrderError(f"server is at stage {self.stage.value}, not {stage.value}")

    def _abort(self, stage: Stage, reason: str) -> BelowThresholdError:
        self.aborted = reason
        self.masked_sum = None
        self.total = None
        return BelowThresholdError(stage.value, reason)

    def _reject(self, node: int, reason: str) -> None:
        self.rejected[node] = reason

    def _holders(self, owner: int) -> frozenset[int]:
        """Nodes that received (and so hold) ``owner``'s shares."""
        return self.holders.get(owner, frozenset())

    def _needed_secrets(self) -> set[int]:
        """Survivors (self masks) and dropped nodes some survivor masked with (mask keys)."""
        needed = set(self.contributors)
        for survivor in self.contributors:
            needed |= set(self.masked_with.get(survivor, ()))
        return needed

    def _require_live(self, stage: Stage, live: Collection[int]) -> None:
        # Each live client needs t live neighbours, so fewer than t + 1 can never finish;
        # this also stops a round in which nobody is left.
        t = self.config.threshold
        if len(live) < t + 1:
            raise self._abort(
                stage, f"only {len(live)} client(s) left, at least t+1={t + 1} are needed"
            )

    def _check_holders(self, stage: Stage, live: set[int]) -> None:
        self._require_live(stage, live)
        t = self.config.threshold
        for owner in sorted(self._needed_secrets()):
            count = len(self._holders(owner) & live)
            if count < t:
                raise self._abort(
                    stage,
                    f"only {count} live holder(s) of node {owner}'s shares, threshold t={t}; "
                    "no further secrets are requested",
                )

    # ------------------------------------------------------------------ stage 0

    def setup_requests(self) -> dict[int, SetupRequest]:
        """AdvertiseKeys requests: the same setup for every sampled node."""
        self._expect(Stage.ADVERTISE_KEYS)
        return {node: self.setup for node in self.setup.node_ids}

    def receive_advertisements(
        self, replies: Mapping[int, KeyAdvertisement]
    ) -> dict[int, ShareKeysRequest]:
        self._expect(Stage.ADVERTISE_KEYS)
        for node, ad in replies.items():
            if node not in self.setup.node_ids:
                self._reject(node, "not sampled for this round")
            elif not isinstance(ad, KeyAdvertisement) or ad.node_id != node:
                self._reject(node, "advertisement names another node")
            elif ad.round_id != self.round_id:
                self._reject(node, "advertisement from another round")
            elif self.config.require_identity and not ed25519_verify(
                self.identity_keys[node], ad.signature, ad.signed_bytes(self._digest)
            ):
                self._reject(node, "advertisement signature does not verify")
            else:
                self.advertisements[node] = ad
        live = set(self.advertisements)
        self._require_live(Stage.ADVERTISE_KEYS, live)
        t = self.config.threshold
        for node in sorted(live):
            count = len(set(self._graph.neighbours(node)) & live)
            if count < t:
                raise self._abort(
                    Stage.ADVERTISE_KEYS,
                    f"node {node} has {count} neighbour(s) with keys, threshold t={t}; "
                    "no secrets were shared",
                )
        self.stage = Stage.SHARE_KEYS
        return {
            node: ShareKeysRequest(
                self.round_id,
                tuple(self.advertisements[j] for j in self._graph.neighbours(node) if j in live),
            )
            for node in sorted(live)
        }

    # ------------------------------------------------------------------ stage 1

    def receive_shares(
        self, replies: Mapping[int, ShareKeysResponse]
    ) -> dict[int, MaskedInputRequest]:
        self._expect(Stage.SHARE_KEYS)
        advertised = set(self.advertisements)
        routes: dict[int, dict[int, EncryptedShare]] = {}
        for node, response in replies.items():
            reason = self._share_reply_problem(node, response, advertised)
            if reason is not None:
                self._reject(node, reason)
                continue
            for share in response.shares:
                routes.setdefault(share.receiver, {})[node] = share
        senders = {node for node in replies if node in advertised and node not in self.rejected}
        self.share_senders = tuple(sorted(senders))
        # Only shares between live senders are forwarded; the server keeps no ciphertext.
        forwarded = {
            receiver: {s: share for s, share in routes.get(receiver, {}).items()}
            for receiver in self.share_senders
        }
        self.masked_with = {r: tuple(sorted(f)) for r, f in forwarded.items()}
        inverse: dict[int, set[int]] = {}
        for receiver, received_from in self.masked_with.items():
            for sender in received_from:
                inverse.setdefault(sender, set()).add(receiver)
        self.holders = {owner: frozenset(nodes) for owner, nodes in inverse.items()}
        self._require_live(Stage.SHARE_KEYS, senders)
        t = self.config.threshold
        for receiver, shares in sorted(forwarded.items()):
            if len(shares) < t:
                raise self._abort(
                    Stage.SHARE_KEYS,
                    f"node {receiver} would get shares from {len(shares)} neighbour(s), "
                    f"threshold t={t}; no masked input was requested",
                )
        for owner in self.share_senders:
            holders = len(self._holders(owner))
            if holders < t:
                raise self._abort(
                    Stage.SHARE_KEYS,
                    f"node {owner}'s shares reach {holders} live neighbour(s), threshold t={t}",
                )
        self.stage = Stage.MASKED_INPUT
        return {
            receiver: MaskedInputRequest(self.round_id, tuple(shares[s] for s in sorted(shares)))
            for receiver, shares in forwarded.items()
        }

    def _share_reply_problem(
        self, node: int, response: ShareKeysResponse, advertised: set[int]
    ) -> str | None:
        if node not in advertised:
            return "did not advertise keys"
        if not isinstance(response, ShareKeysResponse) or response.node_id != node:
            return "share response names another node"
        if response.round_id != self.round_id:
            return "share response from another round"
        allowed = set(self._graph.neighbours(node)) & advertised
        receivers = [share.receiver for share in response.shares]
        if len(set(receivers)) != len(receivers):
            return "two shares for one receiver"
        for share in response.shares:
            if share.sender != node or share.receiver not in allowed:
                return f"share for node {share.receiver}, not a live neighbour"
        return None

    # ------------------------------------------------------------------ stage 2

    def receive_masked_inputs(
        self, replies: Mapping[int, MaskedInput]
    ) -> dict[int, ConsistencyRequest]:
        self._expect(Stage.MASKED_INPUT)
        accepted = []
        for node, reply in sorted(replies.items()):
            if node not in self.masked_with:
                self._reject(node, "sent masked input without having shared keys")
            elif not isinstance(reply, MaskedInput) or reply.node_id != node:
                self._reject(node, "masked input names another node")
            elif reply.round_id != self.round_id:
                self._reject(node, "masked input from another round")
            elif reply.masked.shape != (self.setup.vector_length,):
                self._reject(node, f"masked input has shape {reply.masked.shape}")
            else:
                accepted.append(reply)
        total = np.zeros(self.setup.vector_length, dtype=np.uint32)
        for reply in accepted:
            np.add(total, reply.masked, out=total)  # wraps mod 2^32
        self.masked_sum = total
        self.contributors = tuple(reply.node_id for reply in accepted)
        self._check_holders(Stage.MASKED_INPUT, set(self.contributors))
        self.stage = Stage.CONSISTENCY_CHECK
        return {
            node: ConsistencyRequest(self.round_id, self.contributors) for node in self.contributors
        }

    # ------------------------------------------------------------------ stage 3

    def receive_signatures(
        self, replies: Mapping[int, ConsistencySignature]
    ) -> dict[int, UnmaskRequest]:
        self._expect(Stage.CONSISTENCY_CHECK)
        message = consistency_message(self._digest, self.contributors)
        for node, reply in sorted(replies.items()):
            if node not in self.contributors:
                self._reject(node, "signed without having sent masked input")
            elif not isinstance(reply, ConsistencySignature) or reply.node_id != node:
                self._reject(node, "signature names another node")
            elif reply.round_id != self.round_id:
                self._reject(node, "signature from another round")
            elif not ed25519_verify(
                self.advertisements[node].verify_public, reply.signature, message
            ):
                self._reject(node, "consistency signature does not verify")
            else:
                self.signatures[node] = reply
        self.signers = tuple(sorted(self.signatures))
        self._check_holders(Stage.CONSISTENCY_CHECK, set(self.signers))
        self.stage = Stage.UNMASK
        dropped = self.dropped
        return {
            node: UnmaskRequest(
                self.round_id,
                self.contributors,
                dropped,
                tuple(
                    self.signatures[j]
                    for j in (node, *self._graph.neighbours(node))
                    if j in self.signatures
                ),
            )
            for node in self.signers
        }

    # ------------------------------------------------------------------ stage 4

    def receive_unmask(self, replies: Mapping[int, UnmaskResponse]) -> AggregateResult:
        self._expect(Stage.UNMASK)
        alive, dropped = set(self.contributors), set(self.dropped)
        seed_shares: dict[int, dict[int, np.ndarray]] = {}
        key_shares: dict[int, dict[int, np.ndarray]] = {}
        responders: set[int] = set()
        for node, reply in sorted(replies.items()):
            reason = self._unmask_reply_problem(node, reply, alive, dropped)
            if reason is not None:
                self._reject(node, reason)
                continue
            responders.add(node)
            for share in reply.seed_shares:
                seed_shares.setdefault(share.owner, {})[share.x] = share.elements()
            for share in reply.key_shares:
                key_shares.setdefault(share.owner, {})[share.x] = share.elements()
        self._check_holders(Stage.UNMASK, responders)
        t = self.config.threshold
        # Reconstruct and verify every secret before touching the sum.
        seeds = {
            node: self._reconstruct(node, seed_shares.get(node, {}), t, "self-mask seed")
            for node in self.contributors
        }
        for node, seed in seeds.items():
            if (
                seed_commitment(self._digest, node, seed)
                != self.advertisements[node].seed_commitment
            ):
                raise ReconstructionError(
                    f"node {node}'s reconstructed self-mask seed does not match its commitment"
                )
        mask_keys: dict[int, bytes] = {}
        for node in sorted(self._needed_secrets() - alive):
            key = self._reconstruct(node, key_shares.get(node, {}), t, "mask key")
            if x25519_public(key) != self.advertisements[node].mask_public:
                raise ReconstructionError(
                    f"node {node}'s reconstructed mask key does not match its public key"
                )
            mask_keys[node] = key
        if self.masked_sum is None:
            raise StageOrderError("no masked sum to unmask")
        total = self.masked_sum
        self.masked_sum = None
        expander = MaskExpander(total.size)
        for seed in seeds.values():
            expander.subtract(total, seed)
        for gone, raw_key in mask_keys.items():
            gone_key = x25519_private(raw_key)
            for survivor in self.contributors:
                if gone not in self.masked_with.get(survivor, ()):
                    continue
                seed = pairwise_mask_seed(
                    gone_key,
                    self.advertisements[survivor].mask_public,
                    self._digest,
                    gone,
                    survivor,
                )
                # y_survivor holds +PRG(s) if gone < survivor, −PRG(s) otherwise: undo it.
                if gone < survivor:
                    expander.subtract(total, seed)
                else:
                    expander.add(total, seed)
        self.total = total
        self.stage = Stage.DONE
        return AggregateResult(total, self.contributors, self.dropped, dict(self.rejected))

    def _unmask_reply_problem(
        self, node: int, reply: UnmaskResponse, alive: set[int], dropped: set[int]
    ) -> str | None:
        if node not in self.signatures:
            return "unmask reply from a node that did not sign"
        if not isinstance(reply, UnmaskResponse) or reply.node_id != node:
            return "unmask reply names another node"
        if reply.round_id != self.round_id:
            return "unmask reply from another round"
        owners: set[int] = set()
        for kind, shares, allowed in (
            ("seed", reply.seed_shares, alive),
            ("key", reply.key_shares, dropped),
        ):
            for share in shares:
                if share.owner not in allowed or share.owner in owners:
                    return f"unexpected {kind} share of node {share.owner}"
                if node not in self.masked_with or share.owner not in self.masked_with[node]:
                    return f"{kind} share of node {share.owner}, which never shared with it"
                if share.x != self._graph.share_x(share.owner, node):
                    return f"{kind} share of node {share.owner} at the wrong x-coordinate"
                owners.add(share.owner)
        return None

    def _reconstruct(
        self, owner: int, shares: Mapping[int, np.ndarray], t: int, what: str
    ) -> bytes:
        if len(shares) < t:
            raise self._abort(
                Stage.UNMASK, f"only {len(shares)} share(s) of node {owner}'s {what}, t={t}"
            )
        xs = sorted(shares)[:t]
        values = combine(xs, np.stack([shares[x] for x in xs]))
        return elements_to_secret(values)
