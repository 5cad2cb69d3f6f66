"""False-alarm and detection rates of federated drift monitoring (secure, DP).

For each seed: a one-round non-private training run of ``--clients`` silos on
``--dataset`` (in-process engine) keeps the DP drift reference (histograms of the
training inputs, ε = ``--epsilon`` per silo, summed by SecAgg+); then monitoring
round 1 runs with no drift (every alert is a false alarm) and monitoring round 2
with the inputs of silo ``--drift-silo`` shifted by ``--shift`` standard
deviations on every standardized feature (an alert is a detection within one
round). Both are the real path: ClientApp handlers, ledgers, SecAgg+, noise.

Prints, per seed, the largest PSI over the features in each round, then the
false-alarm rate (share of seeds with any alert in round 1) and the detection rate
(share with an alert in round 2) at each threshold of ``--thresholds``, and the
quantiles of the undrifted maximum PSI the default threshold was chosen from.

    .venv/bin/python benchmarks/drift.py [--seeds 20] [--dataset flchain] [--clients 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedguard.core.config import DatasetName, Engine, LocalDPConfig, PartitionSpec, RunConfig
from fedguard.core.trust_config import DEFAULT_DRIFT_THRESHOLD, TrustConfig
from fedguard.simulation.monitor import simulate_monitoring
from fedguard.simulation.runner import run_variant


def one_seed(seed: int, args: argparse.Namespace, folder: Path) -> tuple[float, float, float]:
    config = RunConfig(
        dataset=DatasetName(args.dataset),
        num_clients=args.clients,
        num_rounds=1,
        partition=PartitionSpec.parse("iid"),
        local_dp=LocalDPConfig(enabled=False),
        trust=TrustConfig(drift=True, drift_epsilon=args.epsilon, drift_bins=args.bins),
        engine=Engine.INPROCESS,
        seed=seed,
        out=folder,
    )
    started = time.monotonic()
    run_dir = folder / f"seed-{seed}" / "no-dp"
    run_variant(config, "no-dp", run_dir)
    quiet, drifted = simulate_monitoring(
        run_dir, rounds=2, drift_silos=[args.drift_silo], shift=args.shift, start=2
    )
    return (
        max(f.psi for f in quiet.features),
        max(f.psi for f in drifted.features),
        time.monotonic() - started,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--dataset", default="flchain")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--drift-silo", type=int, default=2)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--thresholds", default=f"0.01,0.02,0.03,{DEFAULT_DRIFT_THRESHOLD},0.1,0.2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    quiet, drifted = [], []
    print(
        f"{args.dataset}, {args.clients} silos, drift into silo {args.drift_silo} of "
        f"{args.clients} by {args.shift:g} std, ε={args.epsilon:g} per release, "
        f"{args.bins} bins"
    )
    print(f"{'seed':>4} {'max PSI no drift':>17} {'max PSI drifted':>16} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            q, d, seconds = one_seed(seed, args, Path(tmp))
            quiet.append(q)
            drifted.append(d)
            print(f"{seed:>4} {q:>17.4f} {d:>16.4f} {seconds:>8.1f}", flush=True)
    q_arr, d_arr = np.array(quiet), np.array(drifted)
    print(f"\n{'threshold':>9} {'false alarms':>13} {'detected':>9}")
    for text in args.thresholds.split(","):
        t = float(text)
        mark = "  (default)" if t == DEFAULT_DRIFT_THRESHOLD else ""
        print(
            f"{t:>9g} {int((q_arr > t).sum()):>6}/{len(q_arr):<6} "
            f"{int((d_arr > t).sum()):>4}/{len(d_arr):<4}{mark}"
        )
    quantiles = np.quantile(q_arr, [0.5, 0.9, 1.0])
    print(
        "undrifted max PSI: median {:.4f}, 90% {:.4f}, max {:.4f}; drifted max PSI: "
        "min {:.4f}, median {:.4f}".format(*quantiles, d_arr.min(), np.median(d_arr))
    )


if __name__ == "__main__":
    main()
