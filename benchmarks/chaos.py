"""Chaos schedules on a real consortium: kills, restarts, then every invariant checked.

Runs ``--schedules`` seeded schedules (tests/faults/chaos.py: each kills the
SuperLink, the ServerApp or a silo at random points of a short deployed run and
restarts it with the README's commands) on one consortium on 127.0.0.1 (each
schedule gets new silo state folders), and prints one row per schedule (seed,
kills fired, rounds completed, outcome, the invariants that failed) and a summary
line. ``--reports`` also prints each failed schedule's whole report (what
happened when, each invariant's detail). Several minutes per schedule on two
cores; run by hand:

    .venv/bin/python benchmarks/chaos.py --schedules 50 [--first-seed 0] [--reports]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from tests.faults.chaos import (
    CHAOS_BUDGET,
    ROUNDS,
    ChaosResult,
    make_schedule,
    run_schedule,
)
from tests.integration.deployment_harness import consortium_session

_ROW = "{:>5}  {:>5}  {:>6}  {:<22}  {:<6}  {}"


def _row(result: ChaosResult) -> str:
    kinds = Counter(k.target.split(":")[0] for k in result.schedule.kills)
    planned = ",".join(f"{n}x{kind}" for kind, n in sorted(kinds.items()))
    return _ROW.format(
        result.schedule.seed,
        f"{result.kills_fired}/{len(result.schedule.kills)}",
        f"{result.rounds_completed}/{result.schedule.rounds}",
        result.outcome[:22],
        "OK" if result.ok else "FAILED",
        (", ".join(c.name for c in result.failed) + f"  [{planned}]")
        if not result.ok
        else f"[{planned}]",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--wall-limit", type=float, default=300.0, help="seconds per schedule")
    parser.add_argument("--reports", action="store_true", help="print failed schedules' reports")
    parser.add_argument("--dir", type=Path, default=None, help="keep the consortium here")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="fedguard-chaos-"))
    print(f"consortium under {root}; {args.schedules} schedules from seed {args.first_seed}")
    print(_ROW.format("seed", "kills", "rounds", "outcome", "result", "failed invariants"))
    results: list[ChaosResult] = []
    errors: list[tuple[int, str]] = []
    started = time.monotonic()
    seed = args.first_seed
    generation = 0
    while seed < args.first_seed + args.schedules and generation <= args.schedules:
        generation += 1  # a new consortium (after a harness error), at most one per schedule
        try:
            with consortium_session(root / f"consortium-{generation}", CHAOS_BUDGET) as c:
                while seed < args.first_seed + args.schedules:
                    schedule = make_schedule(seed, args.rounds)
                    seed += 1
                    try:
                        result = run_schedule(c, schedule, wall_limit_s=args.wall_limit)
                    except Exception as broken:  # the harness itself failed: new consortium
                        errors.append((schedule.seed, f"{type(broken).__name__}: {broken}"))
                        first = (str(broken).splitlines() or [""])[0][:80]
                        print(_ROW.format(schedule.seed, "?", "?", "harness error", "ERROR",
                                          first), flush=True)  # fmt: skip
                        break
                    results.append(result)
                    print(_row(result), flush=True)
                    if args.reports and not result.ok:
                        print("    " + result.report().replace("\n", "\n    "), flush=True)
        except AssertionError as unclean:  # the consortium's teardown found processes left
            print(f"  (consortium {generation}: {str(unclean)[:200]})", flush=True)
    ok = sum(r.ok for r in results)
    failed = Counter(c.name.split("[")[0] for r in results for c in r.failed)
    outcomes = Counter(r.outcome for r in results)
    print(
        f"summary: {len(results)} schedules ({len(errors)} harness errors), {ok} kept every "
        f"invariant, {len(results) - ok} failed; kills fired "
        f"{sum(r.kills_fired for r in results)}; outcomes {dict(outcomes)}; failed invariants "
        f"{dict(failed) or '{}'}; {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
