"""A hand-stepped SecAgg+ round, so that tests can play a malicious server."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from fedguard.privacy.secagg.client_round import ClientRound
from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import ed25519_keypair, ed25519_public
from fedguard.privacy.secagg.messages import (
    ConsistencyRequest,
    KeyAdvertisement,
    MaskedInputRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from fedguard.privacy.secagg.server_round import AggregateResult, ServerRound


def config(
    n: int, degree: int | None = None, threshold: int | None = None, **kw: object
) -> SecAggConfig:
    k = n - 1 if degree is None else degree
    t = k // 2 + 1 if threshold is None else threshold
    return SecAggConfig(num_clients=n, degree=k, threshold=t, **kw)  # type: ignore[arg-type]


class ManualRound:
    """Server and clients of one round, each stage a separate call."""

    def __init__(
        self,
        cfg: SecAggConfig,
        node_ids: Sequence[int] | None = None,
        *,
        length: int = 8,
        identity: bool = False,
        round_id: bytes = b"round-0001",
        seed: int = 0,
    ) -> None:
        self.node_ids = (
            tuple(node_ids)
            if node_ids is not None
            else tuple(100 + 3 * i for i in range(cfg.num_clients))
        )
        rng = np.random.default_rng(seed)
        self.inputs = {
            node: rng.integers(0, 2**32, length, dtype=np.uint32) for node in self.node_ids
        }
        self.identity_keys = (
            {node: ed25519_keypair()[0] for node in self.node_ids} if identity else None
        )
        self.registry = (
            {node: ed25519_public(key) for node, key in self.identity_keys.items()}
            if self.identity_keys is not None
            else None
        )
        if identity and not cfg.require_identity:
            cfg = dataclasses.replace(cfg, require_identity=True)
        self.server = ServerRound.begin(
            cfg, self.node_ids, length, round_id=round_id, identity_registry=self.registry
        )
        self.clients: dict[int, ClientRound] = {}
        self.ads: dict[int, KeyAdvertisement] = {}

    def advertise(self, skip: Sequence[int] = ()) -> dict[int, ShareKeysRequest]:
        for node, request in self.server.setup_requests().items():
            if node in skip:
                continue
            state, ad = ClientRound.start(
                request,
                node,
                identity_key=None if self.identity_keys is None else self.identity_keys[node],
                identity_registry=self.registry,
            )
            self.clients[node] = state
            self.ads[node] = ad
        return self.server.receive_advertisements(self.ads)

    def share(
        self, requests: Mapping[int, ShareKeysRequest], skip: Sequence[int] = ()
    ) -> dict[int, MaskedInputRequest]:
        replies = {n: self.clients[n].share_keys(r) for n, r in requests.items() if n not in skip}
        return self.server.receive_shares(replies)

    def mask(
        self, requests: Mapping[int, MaskedInputRequest], skip: Sequence[int] = ()
    ) -> dict[int, ConsistencyRequest]:
        replies = {
            n: self.clients[n].mask_input(r, self.inputs[n])
            for n, r in requests.items()
            if n not in skip
        }
        return self.server.receive_masked_inputs(replies)

    def sign(
        self, requests: Mapping[int, ConsistencyRequest], skip: Sequence[int] = ()
    ) -> dict[int, UnmaskRequest]:
        replies = {
            n: self.clients[n].sign_survivors(r) for n, r in requests.items() if n not in skip
        }
        return self.server.receive_signatures(replies)

    def reveal(
        self, requests: Mapping[int, UnmaskRequest], skip: Sequence[int] = ()
    ) -> dict[int, UnmaskResponse]:
        return {n: self.clients[n].unmask(r) for n, r in requests.items() if n not in skip}

    def finish(self, replies: Mapping[int, UnmaskResponse]) -> AggregateResult:
        return self.server.receive_unmask(replies)

    def to_unmask(self) -> dict[int, UnmaskRequest]:
        """Run honestly up to the unmask requests."""
        return self.sign(self.mask(self.share(self.advertise())))

    def expected_sum(self, contributors: Sequence[int]) -> np.ndarray:
        total = np.zeros_like(next(iter(self.inputs.values())))
        for node in contributors:
            total += self.inputs[node]
        return total
