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
    .venv/bin/python benchmarks/secagg.py --auth-only     # authentication cost, n=100, m=10^6

Authentication (``--auth``, on by default; ``--auth-only`` runs nothing else): the same
round with and without identity keys, side by side. With identities every client
signs its advert with its Ed25519 identity key and verifies its k neighbours'
adverts, and, before the round, checks the consortium's roster as a deployed
silo does (:func:`fedguard.client.secure_identity.authenticate_setup`: parse the
signed roster of n silos, verify its ECDSA P-384 signature against the CA key,
build the registry, check the round id binding and the roll-back record); the
server builds the registry and binding (``SecureAggregationSettings.begin``) and
verifies every advert.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
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
class AuthRow:
    n: int
    m: int
    degree: int
    threshold: int
    client_mean_s: tuple[float, float]  # (without identity, with identity)
    client_max_s: tuple[float, float]
    server_s: tuple[float, float]
    round_s: tuple[float, float]
    roster_check_s: float  # per client, included in the "with" client times
    server_setup_s: float  # registry + binding, included in the "with" server time
    sign_s: float  # one Ed25519 advert signature
    verify_s: float  # one Ed25519 advert verification


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


@contextlib.contextmanager
def _clock(kind: str) -> Iterator[None]:
    """``cpu``: every ``time.perf_counter`` reads this process's CPU time instead (the
    protocol's own stage timers too), so other load on the machine does not count."""
    wall = time.perf_counter
    if kind == "cpu":
        time.perf_counter = time.process_time
    try:
        yield
    finally:
        time.perf_counter = wall


def measure_auth(n: int, m: int, repeats: int, clock: str = "cpu") -> AuthRow:
    """One round without and one with identities (best of ``repeats`` each), same inputs."""
    with _clock(clock):
        return _measure_auth(n, m, repeats)


def _measure_auth(n: int, m: int, repeats: int) -> AuthRow:
    import dataclasses
    import tempfile
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.app import ConfigRecord

    from fedguard.client.policy import SiloPolicy
    from fedguard.client.secure_identity import authenticate_setup
    from fedguard.client.silo import SiloSettings, SimulatedSiloSource
    from fedguard.core.config import DatasetName, PartitionSpec, PrivacyBudget
    from fedguard.privacy.secagg.crypto import ed25519_keypair
    from fedguard.privacy.secagg.roster import Roster, SiloIdentity, sign_roster
    from fedguard.server.secure_round import SecAggIdentities, SecureAggregationSettings

    plain = SecAggConfig.recommended(n, dropout_rate=0.1, corrupt_fraction=0.05)
    authenticated = dataclasses.replace(plain, require_identity=True)
    encoder = FixedPointEncoder(plain)
    rounder = StochasticRounder()
    update = np.random.default_rng(n * 7919 + m).normal(scale=0.05, size=m)
    encode_s = _median_time(lambda: encoder.encode(update, weight=7, rounder=rounder), 3)
    encoded = encoder.encode(update, weight=7, rounder=rounder).values
    nodes = list(range(1, n + 1))
    inputs = dict.fromkeys(nodes, encoded)
    keys = {node: ed25519_keypair() for node in nodes}
    silo_of = {node: f"silo-{node}" for node in nodes}
    ca = ec.generate_private_key(ec.SECP384R1())  # the deployment's CA key
    signed = sign_roster(Roster("bench", 1, {silo_of[v]: keys[v][1] for v in nodes}), ca)
    spki = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    identities = SecAggIdentities(signed, silo_of)
    server_settings = SecureAggregationSettings(identities=identities)
    began = time.perf_counter()
    server, options = server_settings.begin(nodes, m + 1)
    server_setup_s = time.perf_counter() - began
    setup = server.setup_requests()[1]
    with tempfile.TemporaryDirectory() as state:
        silo = SiloSettings(
            silo_id=silo_of[1],
            state_dir=Path(state),
            budget=PrivacyBudget(3.0, 1e-5),
            data=SimulatedSiloSource(DatasetName.BREAST_CANCER, 3, PartitionSpec.parse("iid"), 0),
            policy=SiloPolicy(),
            identity=SiloIdentity(keys[1][0], spki),
        )
        record = ConfigRecord(options)
        authenticate_setup(setup, record, silo, 1)  # first sight writes the roll-back record
        roster_check_s = _median_time(lambda: authenticate_setup(setup, record, silo, 1), 5)

    from fedguard.privacy.secagg.crypto import ed25519_sign, ed25519_verify

    signed_bytes = bytes(210)  # the size of KeyAdvertisement.signed_bytes
    signature = ed25519_sign(keys[1][0], signed_bytes)
    sign_s = _median_time(lambda: ed25519_sign(keys[1][0], signed_bytes), 201)
    verify_s = _median_time(lambda: ed25519_verify(keys[1][1], signature, signed_bytes), 201)

    def once(config: SecAggConfig, **kwargs: object) -> tuple[float, float, float, float]:
        began = time.perf_counter()
        outcome = run_round(config, inputs, **kwargs)  # type: ignore[arg-type]
        round_s = time.perf_counter() - began
        client = list(outcome.client_seconds.values())
        return statistics.mean(client), max(client), outcome.server_seconds, round_s

    # Interleaved (without, with, without, ...), the best of each: less sensitive to load.
    runs: dict[bool, list[tuple[float, float, float, float]]] = {False: [], True: []}
    for _ in range(repeats):
        runs[False].append(once(plain))
        runs[True].append(
            once(
                authenticated, identity_keys={v: keys[v][0] for v in nodes}, round_id=setup.round_id
            )
        )
    without = tuple(min(r[i] for r in runs[False]) for i in range(4))
    with_id = tuple(min(r[i] for r in runs[True]) for i in range(4))
    return AuthRow(
        n,
        m,
        plain.degree,
        plain.threshold,
        (encode_s + without[0], encode_s + with_id[0] + roster_check_s),
        (encode_s + without[1], encode_s + with_id[1] + roster_check_s),
        (without[2], with_id[2] + server_setup_s),
        (without[3] + n * encode_s, with_id[3] + n * (encode_s + roster_check_s) + server_setup_s),
        roster_check_s,
        server_setup_s,
        sign_s,
        verify_s,
    )


def print_auth(row: AuthRow, clock: str) -> None:
    print(
        f"\nauthentication cost at n={row.n}, m={_fmt_m(row.m)} (k={row.degree}, "
        f"t={row.threshold}; roster signed with ECDSA P-384; {clock} seconds)",
        flush=True,
    )
    print(f"{'':>22} {'without id':>11} {'with id':>11} {'ratio':>7}")
    for name, (a, b) in (
        ("client s (mean)", row.client_mean_s),
        ("client s (max)", row.client_max_s),
        ("server s", row.server_s),
        ("round s (sequential)", row.round_s),
    ):
        print(f"{name:>22} {a:>11.3f} {b:>11.3f} {b / a:>7.3f}", flush=True)
    print(
        f"  of which: roster check {row.roster_check_s * 1e3:.2f} ms per client, "
        f"server registry + binding {row.server_setup_s * 1e3:.2f} ms",
        flush=True,
    )
    # What authentication adds, operation by operation (not subject to the run-to-run
    # noise of whole rounds): a client checks the roster, signs its advert and verifies
    # its k neighbours'; the server builds the registry and verifies n adverts.
    client = row.roster_check_s + row.sign_s + row.degree * row.verify_s
    server = row.server_setup_s + row.n * row.verify_s
    print(
        f"  authentication's own work: client {client * 1e3:.2f} ms "
        f"(x{1 + client / row.client_mean_s[0]:.3f} of the client time without), server "
        f"{server * 1e3:.2f} ms (x{1 + server / row.server_s[0]:.3f}); one sign "
        f"{row.sign_s * 1e6:.0f} us, one verify {row.verify_s * 1e6:.0f} us",
        flush=True,
    )


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
    parser.add_argument("--auth-n", type=int, default=100, help="n of the authentication cost")
    parser.add_argument("--auth-m", type=int, default=1_000_000, help="m of the same")
    parser.add_argument("--no-auth", action="store_true", help="skip the authentication cost")
    parser.add_argument("--auth-only", action="store_true", help="only the authentication cost")
    parser.add_argument(
        "--auth-clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="the authentication table's clock: process CPU time (robust to load) or wall",
    )
    parser.add_argument("--flower-worker", type=int, nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_worker:
        flower_worker(*args.flower_worker)
        return
    if args.quick:
        args.n, args.m, args.flower_n, args.flower_rounds = [10, 50], [10_000], [10], 2
    flower_m = args.flower_m or args.m
    if args.auth_only:
        auth = measure_auth(args.auth_n, args.auth_m, args.repeats, args.auth_clock)
        print_auth(auth, args.auth_clock)
        return

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
    if not args.no_auth:
        auth = measure_auth(args.auth_n, args.auth_m, args.repeats, args.auth_clock)
        print_auth(auth, args.auth_clock)
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
