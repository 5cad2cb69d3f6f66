"""Secure aggregation cost: fedguard's SecAgg+ against float32 plaintext and Flower's SecAgg+.

For every n (clients) and m (model size) in the grid, and every dropout rate, one
full fedguard round runs in memory through :func:`fedguard.privacy.secagg.run_round`,
with every message and client state serialised as the Flower transport will do:

* client compute: fixed-point encoding plus all five client stages (mean and max
  over clients), per client per round;
* server compute: all server stages, unmasking included;
* upload: bytes a client sends in the round (all stages) against the float32
  plaintext 4·m bytes;
* round: wall time of the whole round run sequentially on one core (n clients
  one after the other, then the server): what it would take with no parallelism.

Dropouts: the given fraction of clients drop after sharing keys and before
uploading their masked input (the costly case: the server must reconstruct their
mask keys and remove their pairwise masks). k and t come from
``SecAggConfig.recommended(n, dropout_rate=0.1, corrupt_fraction=0.05)``
(σ = 40, η = 20), the same for every dropout rate.

In the same run, Flower's own ``SecAggPlusWorkflow`` (legacy ``ServerApp`` with
``DefaultWorkflow``, ``ClientApp`` with ``secaggplus_mod``, Ray simulation with one
CPU per client) runs at the same n, m, number of neighbours and threshold, each
configuration in its own process; its round time is the workflow's wall time,
the median over the rounds after the first (the first includes Ray's actor
start-up). The fedguard/Flower ratio compares per-round wall times.

    .venv/bin/python benchmarks/secagg.py                # full grid, Flower at n ∈ {10, 50}
    .venv/bin/python benchmarks/secagg.py --quick        # n ∈ {10, 50}, m = 10^4, Flower at n=10
    .venv/bin/python benchmarks/secagg.py --n 100 --m 1000000 --no-flower
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedguard.privacy.secagg import (
    FixedPointEncoder,
    SecAggConfig,
    Stage,
    StochasticRounder,
    run_round,
)


@dataclass(frozen=True)
class FedguardRow:
    n: int
    m: int
    dropout: float
    degree: int
    threshold: int
    encode_s: float
    client_mean_s: float
    client_max_s: float
    server_s: float
    upload_ratio: float
    round_s: float


def _median_time(run: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure_fedguard(n: int, m: int, dropout: float, repeats: int) -> FedguardRow:
    config = SecAggConfig.recommended(n, dropout_rate=0.1, corrupt_fraction=0.05)
    encoder = FixedPointEncoder(config)
    rng = np.random.default_rng(n * 7919 + m)
    update = rng.normal(scale=0.05, size=m)
    rounder = StochasticRounder()
    encode_s = _median_time(lambda: encoder.encode(update, weight=7, rounder=rounder), 3)
    encoded = encoder.encode(update, weight=7, rounder=rounder).values
    # One encoded vector for every client: the protocol's cost does not depend on values.
    inputs = dict.fromkeys(range(1, n + 1), encoded)
    dropped = set(range(1, n + 1, max(1, round(1 / dropout)))) if dropout > 0 else set()
    rows = []
    for _ in range(repeats):
        began = time.perf_counter()
        outcome = run_round(config, inputs, dropouts={Stage.MASKED_INPUT: dropped})
        round_s = time.perf_counter() - began
        survivors = outcome.result.contributors
        if len(outcome.result.dropped) != len(dropped):
            raise RuntimeError("unexpected dropouts")
        client = [outcome.client_seconds[node] for node in survivors]
        upload = max(outcome.upload_bytes[node] for node in survivors)
        rows.append(
            FedguardRow(
                n,
                m,
                dropout,
                config.degree,
                config.threshold,
                encode_s,
                encode_s + statistics.mean(client),
                encode_s + max(client),
                outcome.server_seconds,
                upload / (4 * m),
                round_s + n * encode_s,
            )
        )
        del outcome
    return min(rows, key=lambda row: row.round_s)


# --------------------------------------------------------------------------- Flower


def flower_worker(n: int, m: int, rounds: int, num_shares: int, threshold: int) -> None:
    """Run Flower's SecAgg+ (legacy API, Ray simulation); print per-round seconds as JSON."""
    import logging

    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import Grid
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    params = np.random.default_rng(0).normal(scale=0.05, size=m).astype(np.float32)
    times: list[float] = []

    class FixedClient(NumPyClient):
        def fit(
            self, parameters: list[np.ndarray], config: dict[str, bool | bytes | float | int | str]
        ) -> tuple[list[np.ndarray], int, dict[str, bool | bytes | float | int | str]]:
            return [params], 10, {}

    def client_fn(context: Context) -> object:
        return FixedClient().to_client()

    class TimedSecAggPlus(SecAggPlusWorkflow):
        def __call__(self, grid: Grid, context: Context) -> None:
            began = time.perf_counter()
            super().__call__(grid, context)
            times.append(time.perf_counter() - began)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(m, dtype=np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        workflow = TimedSecAggPlus(num_shares=num_shares, reconstruction_threshold=threshold)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)

    run_simulation(
        server_app=server_app,
        client_app=ClientApp(client_fn=client_fn, mods=[secaggplus_mod]),  # type: ignore[arg-type]
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    print("FLOWER_RESULT " + json.dumps({"round_seconds": times}), flush=True)


def measure_flower(n: int, m: int, rounds: int, timeout: float) -> float | None:
    config = SecAggConfig.recommended(n, dropout_rate=0.1, corrupt_fraction=0.05)
    # Flower counts the node itself among the num_shares holders of its secrets.
    command = [
        sys.executable,
        __file__,
        "--flower-worker",
        str(n),
        str(m),
        str(rounds),
        str(config.degree + 1),
        str(config.threshold),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  Flower n={n} m={m}: timed out after {timeout:.0f} s", flush=True)
        return None
    for line in done.stdout.splitlines():
        if line.startswith("FLOWER_RESULT "):
            seconds = json.loads(line.removeprefix("FLOWER_RESULT "))["round_seconds"]
            if not seconds:
                break
            steady = seconds[1:] or seconds
            return float(statistics.median(steady))
    tail = (done.stderr or done.stdout)[-800:]
    print(f"  Flower n={n} m={m} failed (rc {done.returncode}):\n{tail}", flush=True)
    return None


# --------------------------------------------------------------------------- report


def _fmt_m(m: int) -> str:
    exponent = round(np.log10(m))
    return f"10^{exponent}" if 10**exponent == m else str(m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--m", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--repeats", type=int, default=1, help="fedguard rounds per cell (best)")
    parser.add_argument("--flower-n", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--flower-m", type=int, nargs="+", default=None, help="default: --m")
    parser.add_argument("--flower-rounds", type=int, default=3)
    parser.add_argument("--flower-timeout", type=float, default=900.0)
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small grid for a smoke run")
    parser.add_argument("--flower-worker", type=int, nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_worker:
        flower_worker(*args.flower_worker)
        return
    if args.quick:
        args.n, args.m, args.flower_n, args.flower_rounds = [10, 50], [10_000], [10], 2
    flower_m = args.flower_m or args.m

    cpus = len(os.sched_getaffinity(0))
    print(f"fedguard SecAgg+ ({cpus} CPUs usable), dropouts after key sharing", flush=True)
    header = (
        f"{'n':>4} {'m':>6} {'drop':>5} {'k':>3} {'t':>3} {'encode s':>9} "
        f"{'client s':>9} {'client max':>10} {'server s':>9} {'upload/f32':>10} {'round s':>8}"
    )
    print(header, flush=True)
    rows: list[FedguardRow] = []
    for n in args.n:
        for m in args.m:
            for dropout in args.dropouts:
                row = measure_fedguard(n, m, dropout, args.repeats)
                rows.append(row)
                print(
                    f"{row.n:>4} {_fmt_m(row.m):>6} {row.dropout:>5.0%} {row.degree:>3} "
                    f"{row.threshold:>3} {row.encode_s:>9.3f} {row.client_mean_s:>9.3f} "
                    f"{row.client_max_s:>10.3f} {row.server_s:>9.3f} {row.upload_ratio:>10.4f} "
                    f"{row.round_s:>8.2f}",
                    flush=True,
                )
    if args.no_flower:
        return
    print("\nFlower SecAggPlusWorkflow (Ray simulation, 1 CPU per client), 0% dropouts")
    print(
        f"{'n':>4} {'m':>6} {'Flower s/round':>15} {'fedguard s/round':>17} "
        f"{'fedguard/Flower':>16} {'speed-up':>9}"
    )
    for n in args.flower_n:
        for m in flower_m:
            flower_s = measure_flower(n, m, args.flower_rounds, args.flower_timeout)
            ours = next(
                (r.round_s for r in rows if r.n == n and r.m == m and r.dropout == 0.0), None
            )
            if ours is None:
                ours = measure_fedguard(n, m, 0.0, 1).round_s
            if flower_s is None:
                print(f"{n:>4} {_fmt_m(m):>6} {'skipped':>15} {ours:>17.2f}", flush=True)
                continue
            print(
                f"{n:>4} {_fmt_m(m):>6} {flower_s:>15.2f} {ours:>17.2f} "
                f"{ours / flower_s:>16.3f} {flower_s / ours:>8.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
