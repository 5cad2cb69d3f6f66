"""Time per local epoch: non-private SGD vs DP-SGD in each Opacus grad-sample mode.

Runs fedguard's own training functions on one real silo of each data set (the
default 5-silo partition), so the figures are those a silo sees in a round.
Prints a table with the ratio of each DP mode to the non-private epoch.

    .venv/bin/python benchmarks/dp_sgd.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fedguard.client.training import LocalData, train_dp_sgd, train_non_private
from fedguard.core.config import (
    DatasetName,
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    ModelSpec,
    NoiseSource,
    RunConfig,
)
from fedguard.core.datasets import FeatureSchema
from fedguard.core.models import build_model, count_parameters
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.silos import simulation_silos


def _silo(dataset: DatasetName) -> tuple[LocalData, FeatureSchema]:
    defaults = RunConfig()
    silo = simulation_silos(dataset, 5, defaults.partition, 0.2, seed=0)[0]
    scaler = FeatureScaler.from_statistics(FeatureStatistics.from_features(silo.train), silo.schema)
    x = scaler.transform(silo.train.features).reshape((-1, *silo.schema.input_shape))
    return LocalData(np.ascontiguousarray(x, dtype=np.float32), silo.train.labels), silo.schema


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up (allocations, lazy imports)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=["flchain", "breast-cancer", "digits"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_spec = ModelSpec()
    training = LocalTrainingConfig(local_epochs=1, batch_size=64, learning_rate=0.05)
    header = (
        f"{'data set':<14} {'params':>7} {'rows':>5} {'mode':<12} {'s/epoch':>9} {'× non-DP':>9}"
    )
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print(header)
    print("-" * len(header))
    for name in args.datasets:
        dataset = DatasetName.parse(name)
        data, schema = _silo(dataset)

        def fresh(schema: FeatureSchema = schema) -> torch.nn.Module:
            torch.manual_seed(0)
            return build_model(schema, model_spec)

        params = count_parameters(fresh())
        base = _median_seconds(
            lambda data=data: train_non_private(fresh(), data, training, 0), args.repeats
        )
        print(f"{name:<14} {params:>7} {len(data):>5} {'non-private':<12} {base:>9.4f} {1.0:>9.2f}")
        for mode in GradSampleMode:
            for source in (NoiseSource.SEEDED, NoiseSource.CSPRNG):
                dp = LocalDPConfig(grad_sample_mode=mode, noise_source=source)
                seconds = _median_seconds(
                    lambda dp=dp, data=data: train_dp_sgd(fresh(), data, training, dp, 1.0, 0),
                    args.repeats,
                )
                label = f"{mode.value}+{'mt' if source is NoiseSource.SEEDED else 'aes'}"
                print(
                    f"{'':<14} {'':>7} {'':>5} {label:<12} {seconds:>9.4f} {seconds / base:>9.2f}"
                )


if __name__ == "__main__":
    main()
