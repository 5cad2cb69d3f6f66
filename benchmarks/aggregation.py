"""Server aggregation time of every rule at n = 100 inputs of d = 10^6 parameters.

Times ``aggregate(updates, weights)`` of the aggregator :func:`build_aggregator`
makes (input checks included) on float64 updates: 80 honest inputs around a
shared direction plus 20 far outliers, so the robust rules do their real work.
Prints one row per rule, and a few pre-aggregation pipelines, with the median
and the best of ``--repeats`` runs after one warm-up, the issue's targets
(median ≤ 1 s, Krum ≤ 0.5 s on 2 cores), and plain ``np.median`` for comparison.
On a machine with more cores, pin it to two: ``taskset -c 0,1``.

    .venv/bin/python benchmarks/aggregation.py [--n 100] [--d 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from fedguard.aggregation.registry import (
    AggregatorConfig,
    AggregatorName,
    CenterReference,
    PreAggregationName,
    build_aggregator,
)

TARGETS = {"median": 1.0, "krum": 0.5}


def _configs(n: int) -> list[AggregatorConfig]:
    f = n // 5  # as many as the outliers main() plants
    nnm, bucketing = PreAggregationName.NNM, PreAggregationName.BUCKETING
    return [
        AggregatorConfig(AggregatorName.WEIGHTED_MEAN),
        AggregatorConfig(AggregatorName.MEDIAN, f=f),
        AggregatorConfig(AggregatorName.TRIMMED_MEAN, f=f),
        AggregatorConfig(AggregatorName.KRUM, f=f),
        AggregatorConfig(AggregatorName.MULTI_KRUM, f=f),
        AggregatorConfig(AggregatorName.GEOMETRIC_MEDIAN, f=f),
        AggregatorConfig(AggregatorName.GEOMETRIC_MEDIAN, f=f, geomed_iterations=3),
        AggregatorConfig(AggregatorName.CENTERED_CLIPPING, f=f, cc_tau=100.0),
        AggregatorConfig(
            AggregatorName.CENTERED_CLIPPING,
            f=f,
            cc_tau=100.0,
            cc_iterations=3,
            cc_reference=CenterReference.PREVIOUS,
        ),
        AggregatorConfig(AggregatorName.NORM_BOUNDING, norm_bound=100.0),
        AggregatorConfig(AggregatorName.MEDIAN, f=f, pre_aggregation=(bucketing,), bucket_size=2),
        AggregatorConfig(AggregatorName.KRUM, f=f, pre_aggregation=(bucketing,), bucket_size=2),
        AggregatorConfig(AggregatorName.TRIMMED_MEAN, f=f, pre_aggregation=(nnm,)),
        AggregatorConfig(AggregatorName.KRUM, f=f, pre_aggregation=(nnm,)),
    ]


def _describe(config: AggregatorConfig) -> str:
    extras = [f"f={config.f}"] if config.f else []
    for key, value in config.to_options().items():
        if key in {"aggregator", "aggregator-f", "aggregation-seed", "pre-aggregation"}:
            continue
        if value is not None:
            extras.append(f"{key}={value}")
    return f"{config.label} ({', '.join(extras)})" if extras else config.label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    byzantine = args.n // 5
    direction = rng.normal(size=args.d)
    updates = direction + rng.normal(size=(args.n, args.d))
    updates[:byzantine] = -50.0 * direction  # a colluding, far sign-flipped block
    weights = rng.integers(50, 500, args.n).astype(np.float64)
    cores = len(os.sched_getaffinity(0))
    print(
        f"n = {args.n}, d = {args.d:,}, float64 ({updates.nbytes / 2**20:,.0f} MiB), "
        f"{byzantine} outliers, {cores} cores, numpy {np.__version__}, "
        f"median / best of {args.repeats} after a warm-up"
    )
    print(f"{'rule':58s} {'median s':>9s} {'best s':>8s}  target")
    for config in _configs(args.n):
        aggregator = build_aggregator(config)
        aggregator.aggregate(updates, weights)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            aggregator.aggregate(updates, weights)
            times.append(time.perf_counter() - started)
        target = TARGETS.get(config.label) if not config.pre_aggregation else None
        verdict = (
            ""
            if target is None
            else f"<= {target:g} s: " + ("met" if statistics.median(times) <= target else "missed")
        )
        median = statistics.median(times)
        print(f"{_describe(config):58s} {median:9.3f} {min(times):8.3f}  {verdict}")
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        np.median(updates, axis=0)
        times.append(time.perf_counter() - started)
    label = "baseline: np.median(updates, axis=0)"
    print(f"{label:58s} {statistics.median(times):9.3f} {min(times):8.3f}")


if __name__ == "__main__":
    main()
