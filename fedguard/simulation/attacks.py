"""Byzantine silos for research simulations: model- and data-poisoning attacks.

A Byzantine silo runs the same ClientApp as an honest one, except that its
round update comes from an :class:`ByzantineSilo` (the ClientApp's
``adversary_for`` hook) and it ignores the server's request to clip its update
before masking. Attacks therefore work the same with and without secure
aggregation: the crafted update is what the silo masks and sends.

Attacks (``strength`` is each attack's one knob; ``None`` takes the default):

- ``sign-flip``: −s · μ_B, with μ_B the mean honest update of the colluding
  silos (its own honest update without collusion); default s = 4.
- ``scaling``: model replacement (Bagdasaryan et al., AISTATS 2020, eq. 3):
  the silo trains on label-flipped data and sends γ · (X − G), boosting its
  model X over the global model G; default γ = the number of silos (a server
  learning rate of 1).
- ``gaussian``: N(0, σ² I) in place of an update; default σ = 1.
- ``label-flip``: honest training on labels y → C − 1 − y, sent unscaled.
- ``alie``: "A little is enough" (Baruch et al., NeurIPS 2019, §3): μ_B − z σ_B
  coordinate-wise over the colluders' honest updates, z from the paper's
  formula for n silos and f Byzantine (:func:`alie_z`); needs collusion.
- ``ipm``: inner-product manipulation (Xie et al., UAI 2019): −ε μ_B; default
  ε = 0.1.
- ``backdoor``: Bagdasaryan's backdoor: a share of the silo's examples get a
  trigger (the last features set to +3 standard deviations) and the target
  label; the trained update is boosted like ``scaling``. Success is measured by
  :func:`attack_success_rate` on the pooled test sets.

Colluding silos know each other's data (they are one adversary), so each
computes every colluder's honest update itself (non-privately: an attacker
spends no privacy budget), deterministically, and all send the same crafted
vector. The computation is cached per round in the process.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from flwr.app import Message

from fedguard.client.app import LocalUpdate, SiloAgent
from fedguard.client.secure import update_delta
from fedguard.client.silo import SimulatedSiloSource
from fedguard.client.training import LocalData, train_non_private
from fedguard.core.config import RunConfig
from fedguard.core.datasets import SiloData
from fedguard.core.errors import ConfigError
from fedguard.core.models import build_model
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.seeding import derive_seed
from fedguard.core.serialization import (
    ModelWeights,
    flatten_weights,
    load_weights,
    unflatten_weights,
)
from fedguard.core.silos import PooledData, simulation_silos
from fedguard.runs.checkpoints import CheckpointStore
from fedguard.runs.layout import VariantFolder, silo_id
from fedguard.simulation.attack_config import (
    BOOSTED,
    DEFAULT_STRENGTH,
    NEEDS_BENIGN,
    AttackConfig,
    AttackName,
)
from fedguard.wire.protocol import RoundInstructions

#: The backdoor trigger's value, in standard deviations of the federated feature scaler.
TRIGGER_VALUE = 3.0

__all__ = [
    "AttackConfig",
    "AttackName",
    "ByzantineSilo",
    "alie_z",
    "attack_success_rate",
    "craft_alie",
    "craft_ipm",
    "craft_sign_flip",
    "stamp_trigger",
]


# -- the attacks' formulas (pure functions) ------------------------------------------------


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """Baruch et al. (NeurIPS 2019), §3: s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s) / n)."""
    supporters = math.floor(num_clients / 2 + 1) - num_byzantine
    quantile = (num_clients - supporters) / num_clients
    if not 0.0 < quantile < 1.0:
        raise ConfigError(f"alie: no z for n = {num_clients}, f = {num_byzantine}")
    return NormalDist().inv_cdf(quantile)


def craft_alie(benign: np.ndarray, z: float) -> np.ndarray:
    """μ − z σ per coordinate over the colluders' honest updates (rows)."""
    out: np.ndarray = benign.mean(axis=0) - z * benign.std(axis=0)
    return out


def craft_ipm(benign: np.ndarray, epsilon: float) -> np.ndarray:
    """−ε μ: a small step against the honest mean (Xie et al., UAI 2019)."""
    out: np.ndarray = -epsilon * benign.mean(axis=0)
    return out


def craft_sign_flip(benign: np.ndarray, magnitude: float) -> np.ndarray:
    out: np.ndarray = -magnitude * benign.mean(axis=0)
    return out


def trigger_features(num_features: int) -> np.ndarray:
    """The features the backdoor trigger sets: the last ⌈F/16⌉ (the image's last pixels)."""
    count = max(1, math.ceil(num_features / 16))
    return np.arange(num_features - count, num_features)


def stamp_trigger(scaled_features: np.ndarray) -> np.ndarray:
    """Copies of standardized rows with the trigger features set to +3 standard deviations."""
    stamped = np.array(scaled_features, dtype=np.float32, copy=True)
    stamped[:, trigger_features(stamped.shape[1])] = TRIGGER_VALUE
    return stamped


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - labels).astype(np.int64)


# -- the Byzantine silo -------------------------------------------------------------------

_BENIGN_CACHE: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
_CACHE_ROUNDS = 4


class ByzantineSilo:
    """The ``UpdateAdversary`` of one Byzantine silo (see the module docstring)."""

    skips_clipping = True

    def __init__(
        self,
        attack: AttackConfig,
        own_index: int,
        colluders: Sequence[SimulatedSiloSource],
        num_clients: int,
    ) -> None:
        self.attack = attack
        self.own_index = own_index
        self.colluders = tuple(colluders)
        self.num_clients = num_clients

    @property
    def strength(self) -> float:
        if self.attack.strength is not None:
            return self.attack.strength
        if self.attack.name in BOOSTED:
            return float(self.num_clients)
        if self.attack.name is AttackName.ALIE:
            return alie_z(self.num_clients, len(self.colluders))
        return DEFAULT_STRENGTH[self.attack.name]

    def local_update(self, agent: SiloAgent, message: Message) -> LocalUpdate:
        instructions = agent.instructions(message)
        global_weights = agent.global_weights(message)
        scaler = agent.scaler(message)
        silo = agent.settings.data.load()
        name = self.attack.name
        seed = derive_seed(instructions.seed, "attack", agent.settings.silo_id, instructions.round)
        num_examples = len(silo.train)
        if name in NEEDS_BENIGN:
            benign = self._benign_updates(instructions, global_weights, scaler, silo)
            if name is AttackName.SIGN_FLIP:
                delta = craft_sign_flip(benign, self.strength)
            elif name is AttackName.IPM:
                delta = craft_ipm(benign, self.strength)
            else:
                delta = craft_alie(benign, self.strength)
        elif name is AttackName.GAUSSIAN:
            size = flatten_weights(global_weights).size
            delta = np.random.default_rng(seed).normal(0.0, self.strength, size)
        else:
            data = _scaled(silo, scaler, train=True)
            if name is AttackName.BACKDOOR:
                data = self._poisoned(data, silo, seed)
            else:  # label-flip, scaling
                data = LocalData(data.features, flip_labels(data.labels, silo.schema.num_classes))
            delta = _trained_delta(instructions, global_weights, silo, data, seed)
            if name in BOOSTED:
                delta = self.strength * delta
        weights = unflatten_weights(flatten_weights(global_weights) + delta, global_weights)
        metrics = {"num-examples": float(num_examples), "train-loss": 0.0, "byzantine": 1.0}
        return LocalUpdate(global_weights, weights, metrics)

    def _poisoned(self, data: LocalData, silo: SiloData, seed: int) -> LocalData:
        rng = np.random.default_rng(seed)
        flat = data.features.reshape(len(data), -1)
        chosen = rng.random(len(data)) < self.attack.poison_fraction
        features = flat.copy()
        features[chosen] = stamp_trigger(flat[chosen])
        labels = data.labels.copy()
        labels[chosen] = self.attack.backdoor_target
        return LocalData(features.reshape(data.features.shape), labels)

    def _benign_updates(
        self,
        instructions: RoundInstructions,
        global_weights: ModelWeights,
        scaler: FeatureScaler,
        own: SiloData,
    ) -> np.ndarray:
        """The honest updates of every colluder (or of this silo alone), cached per round."""
        sources = self.colluders if self.attack.collusion else ()
        key = (
            instructions.run_id,
            instructions.round,
            self.attack.collusion,
            tuple(s.index for s in sources) or (self.own_index,),
        )
        cached = _BENIGN_CACHE.get(key)
        if cached is not None:
            return cached
        silos = [(s.index, s.load()) for s in sources] or [(self.own_index, own)]
        rows = []
        for index, silo in silos:
            seed = derive_seed(instructions.seed, "attack-benign", index, instructions.round)
            data = _scaled(silo, scaler, train=True)
            rows.append(_trained_delta(instructions, global_weights, silo, data, seed))
        benign = np.stack(rows)
        _BENIGN_CACHE[key] = benign
        while len(_BENIGN_CACHE) > _CACHE_ROUNDS:
            _BENIGN_CACHE.popitem(last=False)
        return benign


def _scaled(silo: SiloData, scaler: FeatureScaler, *, train: bool) -> LocalData:
    part = silo.train if train else silo.test
    features = scaler.transform(part.features).reshape((-1, *silo.schema.input_shape))
    return LocalData(np.ascontiguousarray(features, dtype=np.float32), part.labels)


def _trained_delta(
    instructions: RoundInstructions,
    global_weights: ModelWeights,
    silo: SiloData,
    data: LocalData,
    seed: int,
) -> np.ndarray:
    model = build_model(silo.schema, instructions.model)  # the attacker's own copy
    load_weights(model, global_weights)
    result = train_non_private(model, data, instructions.training, seed)
    return update_delta(global_weights, result.weights)


def adversaries(attack: AttackConfig, config: RunConfig) -> dict[str, ByzantineSilo]:
    """One :class:`ByzantineSilo` per Byzantine silo id (``silo-<index>``)."""
    indices = attack.byzantine_indices(config.num_clients, config.seed)
    sources = [
        SimulatedSiloSource(
            data=PooledData.for_run(config),
            num_silos=config.num_clients,
            partition=config.partition,
            index=i,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
        for i in indices
    ]
    return {silo_id(i): ByzantineSilo(attack, i, sources, config.num_clients) for i in indices}


@torch.no_grad()
def attack_success_rate(
    config: RunConfig, attack: AttackConfig, run_dir: Path, round_number: int | None = None
) -> float:
    """Backdoor success: the share of triggered test rows (true class ≠ target) the model
    puts in the target class, over every silo's test split (researcher-side metric)."""
    store = CheckpointStore(VariantFolder(run_dir).checkpoints)
    checkpoint = store.latest() if round_number is None else store.load(round_number)
    if checkpoint is None:
        raise ConfigError(f"{run_dir} has no checkpoint")
    weights, scaler = checkpoint.weights(), checkpoint.scaler()
    silos = simulation_silos(
        PooledData.for_run(config),
        config.num_clients,
        config.partition,
        config.test_fraction,
        config.seed,
    )
    schema = silos[0].schema
    features = np.concatenate([s.test.features for s in silos])
    labels = np.concatenate([s.test.labels for s in silos])
    keep = labels != attack.backdoor_target
    stamped = stamp_trigger(scaler.transform(features[keep]).astype(np.float32))
    model = build_model(schema, config.model)
    load_weights(model, weights)
    model.eval()
    inputs = torch.from_numpy(stamped.reshape((-1, *schema.input_shape)))
    predicted = model(inputs).argmax(dim=1).numpy()
    return float((predicted == attack.backdoor_target).mean()) if len(predicted) else float("nan")
