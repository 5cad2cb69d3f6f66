"""Local training inside one silo: DP-SGD with Opacus, a non-private twin, and evaluation.

DP-SGD (Abadi et al., CCS 2016) as Opacus implements it: Poisson sampling of each
record with rate ``q`` per step, per-sample gradients clipped to ``max_grad_norm``,
Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` on the
sum, divided by the expected batch size. The number of steps and ``q`` are those
of :func:`fedguard.privacy.analysis.dp_sgd.poisson_schedule`; the loader Opacus
builds is checked against them, so the ledger charges what actually runs.

Two details Opacus leaves to the caller:

* Empty Poisson batches. The privacy analysis counts every step as one noisy
  release, so an empty batch still takes a step made of noise alone (skipping it
  would reveal that the batch was empty). Opacus's ``ew`` engine cannot run a
  forward pass on an empty batch, so all engines take the same explicit path.
* The noise source. Opacus draws noise from torch's Mersenne Twister unless
  ``secure_mode=True``, which needs torchcsprng (not installable here). With
  :attr:`NoiseSource.CSPRNG` the optimizer's ``add_noise`` draws from
  :class:`fedguard.privacy.noise.CsprngGaussian` instead (see that module for the
  threat model). Opacus has no hook for a non-torch noise source, so the
  optimizer's class is swapped for a subclass that overrides only ``add_noise``.
  The Poisson batches likewise: Opacus samples them from torch's global
  generator, which a seed known to the server would make reproducible (and
  amplification by subsampling assumes the batches are secret), so the batch
  sampler's class is swapped for one that draws each record's Bernoulli(q) from
  the CSPRNG.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedguard.client.policy import PolicyRefusalError, RefusalReason
from fedguard.client.silo import SiloSettings
from fedguard.core.config import (
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    ModelFamily,
    NoiseSource,
    OptimizerKind,
)
from fedguard.core.datasets import FeatureSchema
from fedguard.core.errors import ConfigError, FedguardError
from fedguard.core.metrics import score_histograms
from fedguard.core.models import architecture_hash, build_model
from fedguard.core.serialization import ModelWeights, model_weights
from fedguard.privacy.analysis.dp_sgd import poisson_schedule
from fedguard.privacy.noise import CsprngGaussian, seeded_torch_generator
from fedguard.wire.protocol import RoundInstructions


@dataclass(frozen=True)
class LocalData:
    """One silo's scaled features (float32) and labels (int64), ready for torch."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.features.dtype != np.float32 or self.labels.dtype != np.int64:
            raise ConfigError("LocalData needs float32 features and int64 labels")
        if len(self.features) != len(self.labels):
            raise ConfigError(f"{len(self.features)} feature rows but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.features), torch.from_numpy(self.labels))


@dataclass(frozen=True)
class TrainResult:
    weights: ModelWeights
    num_examples: int
    steps: int
    sample_rate: float
    mean_loss: float


@dataclass(frozen=True)
class EvaluationResult:
    """Sums, not means, so the server can pool silos exactly."""

    num_examples: int
    loss_sum: float
    correct: int
    # Binary tasks only: histograms of the positive-class probability per true label.
    positive_histogram: np.ndarray | None = None
    negative_histogram: np.ndarray | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_examples if self.num_examples else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_examples if self.num_examples else float("nan")


class TrainingError(FedguardError):
    """Local training failed (for example, it diverged to NaN)."""


def make_optimizer(model: nn.Module, training: LocalTrainingConfig) -> torch.optim.Optimizer:
    if training.optimizer is OptimizerKind.ADAM:
        return torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    return torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )


#: A loss over one Poisson batch of a DP-SGD loader: ``(private model, batch tensors)``.
BatchLoss = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class DpSgdRun:
    """What :func:`run_dp_sgd` did: the accounted schedule and the per-step losses."""

    sample_rate: float
    steps: int
    losses: list[float]


def run_dp_sgd(
    model: nn.Module,
    dataset: TensorDataset,
    training: LocalTrainingConfig,
    dp: LocalDPConfig,
    noise_multiplier: float,
    seed: int,
    batch_loss: BatchLoss | None = None,
) -> DpSgdRun:
    """DP-SGD on ``model`` (modified in place) with exactly the accounted schedule.

    The one DP-SGD loop of fedguard (local training and federated distillation):
    Opacus with Poisson sampling at the rate and step count of
    :func:`~fedguard.privacy.analysis.dp_sgd.poisson_schedule` (checked, or it
    refuses to train), a noise-only step for each empty Poisson batch, and CSPRNG
    noise unless the seeded source is configured. ``dataset``'s first two tensors
    are features and labels; without ``batch_loss`` the loss is cross-entropy
    through Opacus's criterion (which ghost clipping needs); with it, the loss of
    each batch is ``batch_loss(private_model, batch)`` (ghost clipping refused).
    With :attr:`NoiseSource.CSPRNG` both the Poisson batches and the noise come from
    an ``os.urandom``-keyed CSPRNG in this process: amplification by subsampling
    needs the batches secret from the server, and ``seed`` is known to it. Only
    :attr:`NoiseSource.SEEDED` (simulation research mode) uses ``seed`` for both.
    """
    num_examples = len(dataset)
    if num_examples == 0:
        raise ConfigError("cannot train on an empty data set")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")
    if batch_loss is not None and dp.grad_sample_mode is GradSampleMode.GHOST:
        raise ConfigError("ghost clipping needs Opacus's criterion: not with a custom loss")
    sample_rate, steps = poisson_schedule(num_examples, training.batch_size, training.local_epochs)
    if dp.noise_source is NoiseSource.SEEDED:
        torch.manual_seed(seed)  # research mode: reproducible batches (Opacus uses torch's RNG)
    private_model, optimizer, criterion, private_loader = _make_private(
        model, dataset, training, dp, noise_multiplier, seed
    )
    _check_schedule(private_loader, training, sample_rate, steps)
    if dp.noise_source is NoiseSource.CSPRNG:
        use_csprng_noise(optimizer, CsprngGaussian())
        use_csprng_sampling(private_loader.batch_sampler, CsprngGaussian())

    private_model.train()
    # Opacus's hooks fire on the first layer although the inputs need no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

    def loss_of(batch: Sequence[torch.Tensor]) -> Any:
        if batch_loss is None:
            return criterion(private_model(batch[0]), batch[1])
        return batch_loss(private_model, batch)

    losses = _take_steps(optimizer, private_loader, training.local_epochs, steps, loss_of)
    return DpSgdRun(sample_rate, steps, losses)


def _make_private(
    model: nn.Module,
    dataset: TensorDataset,
    training: LocalTrainingConfig,
    dp: LocalDPConfig,
    noise_multiplier: float,
    seed: int,
) -> tuple[nn.Module, DPOptimizer, Any, Any]:
    """Opacus's (model, optimizer, criterion, Poisson loader) for ``model``."""
    loader = DataLoader(dataset, batch_size=training.batch_size)
    criterion: Any = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off; fedguard supplies its own noise source.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")  # fedguard's ledger accounts; this one is unused
    generator = seeded_torch_generator(seed) if dp.noise_source is NoiseSource.SEEDED else None
    wrapped = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, training),
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=dp.grad_sample_mode.value,
        noise_generator=generator,
    )
    if len(wrapped) == 4:
        private_model, optimizer, criterion, private_loader = wrapped
    else:
        private_model, optimizer, private_loader = wrapped
    return private_model, optimizer, criterion, private_loader


def _check_schedule(
    private_loader: Any, training: LocalTrainingConfig, sample_rate: float, steps: int
) -> None:
    """Refuse to train unless Opacus's loader runs exactly the accounted schedule."""
    actual_rate = private_loader.batch_sampler.sample_rate
    if not math.isclose(actual_rate, sample_rate, rel_tol=1e-12) or (
        len(private_loader) * training.local_epochs != steps
    ):
        raise TrainingError(
            f"Opacus sampling (q={actual_rate}, {len(private_loader)} steps/epoch) differs "
            f"from the accounted schedule (q={sample_rate}, {steps} steps); refusing to train"
        )


def _take_steps(
    optimizer: DPOptimizer,
    private_loader: Any,
    epochs: int,
    steps: int,
    loss_of: Callable[[Sequence[torch.Tensor]], Any],
) -> list[float]:
    """Every step of ``epochs`` passes over the Poisson loader (a noise-only step for an
    empty batch); the losses of the non-empty ones."""
    losses: list[float] = []
    taken = 0
    for _ in range(epochs):
        for batch in private_loader:
            optimizer.zero_grad()
            if len(batch[1]) == 0:
                _noise_only_step(optimizer)
            else:
                loss = loss_of(batch)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            taken += 1
    if taken != steps:
        raise TrainingError(f"took {taken} DP-SGD steps, the ledger charged {steps}")
    return losses


def train_dp_sgd(
    model: nn.Module,
    data: LocalData,
    training: LocalTrainingConfig,
    dp: LocalDPConfig,
    noise_multiplier: float,
    seed: int,
) -> TrainResult:
    """Run ``training.local_epochs`` epochs of DP-SGD on ``model`` (modified in place).

    ``seed`` drives Poisson sampling and, with :attr:`NoiseSource.SEEDED`, the
    noise; with :attr:`NoiseSource.CSPRNG` the noise ignores it.
    """
    run = run_dp_sgd(model, data.dataset(), training, dp, noise_multiplier, seed)
    return training_result(model, len(data), run, "local DP-SGD diverged: the model")


def training_result(
    model: nn.Module, num_examples: int, run: DpSgdRun, diverged: str
) -> TrainResult:
    """The trained weights and their figures; a model holding NaN or Inf is refused.

    ``diverged`` names what diverged in the error (``"... : the model"``).
    """
    weights = model_weights(model)
    if not all(np.isfinite(v).all() for v in weights.values()):
        raise TrainingError(f"{diverged} holds NaN or Inf")
    return TrainResult(
        weights=weights,
        num_examples=num_examples,
        steps=run.steps,
        sample_rate=run.sample_rate,
        mean_loss=float(np.mean(run.losses)) if run.losses else float("nan"),
    )


def _noise_only_step(optimizer: DPOptimizer) -> None:
    """One DP-SGD step for an empty Poisson batch: a zero gradient plus noise."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype)
        p.grad = torch.zeros_like(p)  # the ghost-clipping optimizer reads p.grad
    optimizer.step()


def train_non_private(
    model: nn.Module, data: LocalData, training: LocalTrainingConfig, seed: int
) -> TrainResult:
    """The ``--no-dp`` twin: same epochs, batch size and optimizer; shuffled batches."""
    run = run_non_private(model, data.dataset(), training, seed)
    return training_result(model, len(data), run, "local training diverged: the model")


def run_non_private(
    model: nn.Module,
    dataset: TensorDataset,
    training: LocalTrainingConfig,
    seed: int,
    batch_loss: BatchLoss | None = None,
) -> DpSgdRun:
    """The non-private twin of :func:`run_dp_sgd`: shuffled batches, no clipping, no noise.

    Only for the ``no-dp`` research variants (local training, distillation); the
    loss is as in :func:`run_dp_sgd`. The run's sample rate is 1 (no sampling).
    """
    if len(dataset) == 0:
        raise ConfigError("cannot train on an empty data set")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(model, training)
    criterion = nn.CrossEntropyLoss()
    model.train()
    losses: list[float] = []
    for _ in range(training.local_epochs):
        for batch in loader:
            optimizer.zero_grad()
            if batch_loss is None:
                loss = criterion(model(batch[0]), batch[1])
            else:
                loss = batch_loss(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return DpSgdRun(steps=len(losses), sample_rate=1.0, losses=losses)


@torch.no_grad()
def evaluate(model: nn.Module, data: LocalData, num_classes: int) -> EvaluationResult:
    """Loss and accuracy sums, plus score histograms for a binary task."""
    model.eval()
    if len(data) == 0:
        return EvaluationResult(num_examples=0, loss_sum=0.0, correct=0)
    features = torch.from_numpy(data.features)
    labels = torch.from_numpy(data.labels)
    logits = model(features)
    loss_sum = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    correct = int((logits.argmax(dim=1) == labels).sum())
    if num_classes != 2:
        return EvaluationResult(len(data), loss_sum, correct)
    scores = torch.softmax(logits, dim=1)[:, 1].numpy()
    positive, negative = score_histograms(scores, data.labels)
    return EvaluationResult(len(data), loss_sum, correct, positive, negative)


# --- CSPRNG noise inside Opacus's optimizer -----------------------------------------

_CSPRNG_CLASSES: dict[tuple[type, str], type] = {}


def _csprng_add_noise(self: Any) -> None:
    # Mirrors DPOptimizer.add_noise (Opacus 1.6) with the noise drawn from a CSPRNG.
    if getattr(self, "_adjusted_noise_multiplier", None) is not None:
        raise TrainingError("adaptive clipping is not supported with CSPRNG noise")
    sampler: CsprngGaussian = self._fedguard_noise
    std = self.noise_multiplier * self.max_grad_norm
    for p in self.params:
        _check_processed_flag(p.summed_grad)
        noise = sampler.sample(tuple(p.summed_grad.shape), std=std, dtype=p.summed_grad.dtype)
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


def _csprng_poisson_batches(self: Any) -> Iterator[list[int]]:
    # Mirrors UniformWithReplacementSampler.__iter__ (Opacus 1.6) with each record's
    # Bernoulli(q) draw from a CSPRNG instead of torch's (Mersenne Twister) generator.
    uniforms: CsprngGaussian = self._fedguard_uniforms
    for _ in range(self.steps):
        chosen = np.flatnonzero(uniforms.uniform(self.num_samples) < self.sample_rate)
        yield chosen.tolist()


def use_csprng_sampling(batch_sampler: Any, uniforms: CsprngGaussian) -> None:
    """Make Opacus's Poisson ``batch_sampler`` draw its batches from ``uniforms``."""
    if not isinstance(batch_sampler, UniformWithReplacementSampler):
        raise TrainingError(
            f"expected Opacus's Poisson sampler, got {type(batch_sampler).__name__}"
        )
    _override(batch_sampler, "__iter__", _csprng_poisson_batches, "_fedguard_uniforms", uniforms)


def use_csprng_noise(optimizer: DPOptimizer, sampler: CsprngGaussian) -> None:
    """Make ``optimizer`` draw its Gaussian noise from ``sampler``."""
    _override(optimizer, "add_noise", _csprng_add_noise, "_fedguard_noise", sampler)


def _override(
    target: Any, method: str, replacement: Callable[..., Any], attribute: str, source: Any
) -> None:
    """Swap ``target``'s class for a cached subclass overriding ``method``; attach ``source``.

    Opacus has no hook for a non-torch random source, so the one method that draws
    is overridden and the rest of the object is left as Opacus built it.
    """
    base = type(target)
    cls = _CSPRNG_CLASSES.get((base, method))
    if cls is None:
        cls = type(f"Csprng{base.__name__}", (base,), {method: replacement})
        _CSPRNG_CLASSES[(base, method)] = cls
    target.__class__ = cls
    setattr(target, attribute, source)  # an attribute Opacus lacks


def silo_model(
    settings: SiloSettings, schema: FeatureSchema, instructions: RoundInstructions
) -> nn.Module:
    """The model this silo trains or evaluates, refused unless it is the server's.

    A ``factory`` model comes from the silo's own ``model-factory`` (never the name
    the server sent); every model's architecture hash must equal the instruction's.
    """
    spec = instructions.model
    if spec.family is ModelFamily.FACTORY:
        if not settings.model_factory:
            raise PolicyRefusalError(
                RefusalReason.MODEL_ARCHITECTURE,
                f"the server trains the consortium's own model ({spec.factory!r}); silo "
                f"{settings.silo_id} has no model-factory in its node config",
            )
        spec = replace(spec, factory=settings.model_factory)
    model = build_model(schema, spec)
    own = architecture_hash(model)
    if instructions.model_hash != own:
        raise PolicyRefusalError(
            RefusalReason.MODEL_ARCHITECTURE,
            f"the server's model architecture ({instructions.model_hash[:12] or 'none'}) is "
            f"not silo {settings.silo_id}'s own ({own[:12]}, {spec.family.value})",
        )
    return model
