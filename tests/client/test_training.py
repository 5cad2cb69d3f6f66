import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from fedguard.client.training import (
    LocalData,
    evaluate,
    train_dp_sgd,
    train_non_private,
)
from fedguard.core.config import (
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    NoiseSource,
)
from fedguard.core.errors import ConfigError
from fedguard.core.serialization import model_weights
from fedguard.privacy.analysis.dp_sgd import poisson_schedule

FULL_BATCH = LocalTrainingConfig(local_epochs=1, batch_size=10_000, learning_rate=1.0, momentum=0.0)


def _data(n: int, d: int, seed: int = 0, scale: float = 1.0) -> LocalData:
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=(n, d))).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return LocalData(x, y)


def _clipped_mean_gradient(
    model: nn.Module, data: LocalData, clip: float
) -> dict[str, torch.Tensor]:
    """Naive reference: per-sample gradients one by one, clipped, summed, / n."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(data)):
        model.zero_grad()
        x = torch.from_numpy(data.features[i : i + 1])
        y = torch.from_numpy(data.labels[i : i + 1])
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name in total:
            total[name] += grads[name] * factor
    return {name: g / len(data) for name, g in total.items()}


@pytest.mark.parametrize(
    "mode", [GradSampleMode.HOOKS, GradSampleMode.FUNCTORCH, GradSampleMode.EW]
)
def test_per_sample_clipping_matches_naive_reference(mode: GradSampleMode) -> None:
    # q = 1 (one batch holds every record) and σ = 0: one step is exactly
    # -lr * mean_i clip(g_i). Large inputs make every gradient exceed the bound,
    # so a missing or wrong clip changes the result.
    torch.manual_seed(0)
    data = _data(40, 5, scale=30.0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.copy() for k, v in model_weights(model).items()}
    expected = _clipped_mean_gradient(model, data, clip=0.5)
    dp = LocalDPConfig(max_grad_norm=0.5, grad_sample_mode=mode, noise_source=NoiseSource.SEEDED)
    result = train_dp_sgd(model, data, FULL_BATCH, dp, noise_multiplier=0.0, seed=1)
    assert result.steps == 1 and result.sample_rate == 1.0
    for i, (name, value) in enumerate(result.weights.items()):
        key = list(expected)[i]
        np.testing.assert_allclose(
            before[name] - value, expected[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=name
        )


def test_clipping_bounds_the_step_norm() -> None:
    # Identical records with huge gradients: the update norm is lr * C, not lr * |g|.
    data = LocalData(np.full((20, 3), 50.0, np.float32), np.zeros(20, np.int64))
    model = nn.Linear(3, 2)
    before = np.concatenate([v.ravel() for v in model_weights(model).values()])
    dp = LocalDPConfig(max_grad_norm=0.25, noise_source=NoiseSource.SEEDED)
    result = train_dp_sgd(model, data, FULL_BATCH, dp, noise_multiplier=0.0, seed=0)
    after = np.concatenate([v.ravel() for v in result.weights.values()])
    assert np.linalg.norm(after - before) == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("source", [NoiseSource.CSPRNG, NoiseSource.SEEDED])
def test_noise_has_the_configured_spread(source: NoiseSource) -> None:
    # Zero inputs and no bias: every per-sample gradient is exactly zero, so the one
    # step is -lr * N(0, (σC)^2) / (expected batch size). Theorem (Abadi et al. 2016,
    # Alg. 1): the noise on the summed clipped gradient has std σ·C per coordinate.
    n, d, sigma, clip = 50, 2000, 1.3, 0.7
    data = LocalData(np.zeros((n, d), np.float32), np.zeros(n, np.int64))
    model = nn.Linear(d, 2, bias=False)
    before = model.weight.detach().numpy().copy()
    dp = LocalDPConfig(max_grad_norm=clip, noise_source=source)
    result = train_dp_sgd(model, data, FULL_BATCH, dp, noise_multiplier=sigma, seed=3)
    noise = (before - result.weights["weight"]).ravel().astype(np.float64) * n  # lr = 1, q·n = n
    k = noise.size
    # Variance: (k-1) s^2 / σ_true^2 ~ chi2(k-1); a 99.9% interval.
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], k - 1)
    statistic = (k - 1) * noise.var(ddof=1) / (sigma * clip) ** 2
    assert lo < statistic < hi, f"noise std {noise.std():.4f}, expected {sigma * clip:.4f}"
    assert stats.kstest(noise / (sigma * clip), "norm").pvalue > 0.001
    assert abs(noise.mean()) < 4 * sigma * clip / np.sqrt(k)


def test_csprng_noise_differs_between_runs_with_the_same_seed() -> None:
    data = LocalData(np.zeros((10, 50), np.float32), np.zeros(10, np.int64))
    dp = LocalDPConfig(noise_source=NoiseSource.CSPRNG)
    outs = []
    for _ in range(2):
        model = nn.Linear(50, 2, bias=False)
        nn.init.zeros_(model.weight)
        outs.append(train_dp_sgd(model, data, FULL_BATCH, dp, 1.0, seed=7).weights["weight"])
    assert not np.array_equal(outs[0], outs[1])


def test_seeded_noise_is_reproducible() -> None:
    data = _data(30, 4)
    dp = LocalDPConfig(noise_source=NoiseSource.SEEDED)
    training = LocalTrainingConfig(batch_size=8, learning_rate=0.1)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        outs.append(train_dp_sgd(model, data, training, dp, 1.0, seed=11).weights["weight"])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_every_engine_survives_empty_poisson_batches(mode: GradSampleMode) -> None:
    # q = 1/5 on 5 records: about a third of the steps see an empty batch; each one
    # is still a noisy step, and the number of steps equals the accounted schedule.
    data = _data(5, 3)
    training = LocalTrainingConfig(local_epochs=4, batch_size=1, learning_rate=0.05)
    dp = LocalDPConfig(grad_sample_mode=mode, noise_source=NoiseSource.SEEDED)
    result = train_dp_sgd(nn.Linear(3, 2), data, training, dp, 1.0, seed=5)
    assert (result.sample_rate, result.steps) == poisson_schedule(5, 1, 4)
    assert all(np.isfinite(v).all() for v in result.weights.values())


def test_training_refuses_empty_data_and_bad_sigma() -> None:
    dp = LocalDPConfig()
    empty = LocalData(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ConfigError):
        train_dp_sgd(nn.Linear(3, 2), empty, FULL_BATCH, dp, 1.0, seed=0)
    with pytest.raises(ConfigError):
        train_dp_sgd(nn.Linear(3, 2), _data(4, 3), FULL_BATCH, dp, float("nan"), seed=0)


def test_non_private_training_learns_and_evaluate_counts() -> None:
    data = _data(400, 4, seed=2)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = evaluate(model, data, 2)
    train_non_private(
        model, data, LocalTrainingConfig(local_epochs=5, batch_size=32, learning_rate=0.1), 0
    )
    after = evaluate(model, data, 2)
    assert after.accuracy > 0.9 > before.accuracy or after.loss < before.loss
    assert after.num_examples == 400
    assert after.positive_histogram is not None and after.negative_histogram is not None
    assert after.positive_histogram.sum() + after.negative_histogram.sum() == 400
