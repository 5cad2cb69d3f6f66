"""Issue 13, the chaos test: a deployed run under a seeded random schedule of SIGKILLs.

A real consortium on 127.0.0.1 (CA, SuperLink, three SuperNodes with the warm
executor) runs a 3-round DP run while :func:`tests.faults.chaos.make_schedule`'s
schedule kills the SuperLink, the ServerApp or a silo and restarts what it killed
with the README's commands; then every invariant of :mod:`tests.faults.chaos`
must hold: the audit log verifies, every round is audited exactly once, every
silo's ledger equals its signed silo log, no silo is past its budget, and the run
either completed or its last ``run-end`` says why not, with every attempt ended.

CI runs seed 4 (kills the ServerApp mid-run; 144 s here). Seed 62 kills the
SuperLink, then the restarted run's ServerApp, then a silo: all invariants hold
(``FEDGUARD_CHAOS_SEEDS=62``, 201 s here), kept out of CI only for the suite's
15-minute budget. Before the run lock (``serverapp.lock``) and ``fedguard run``
stopping earlier unfinished attempts, it failed on ``one-serverapp``: Flower
launched the killed attempt's ServerApp again beside the new one. ``python
benchmarks/chaos.py --schedules 50`` runs fifty. A failure prints the whole
schedule, what happened when, and each invariant's result.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.faults.chaos import CHAOS_BUDGET, make_schedule, run_schedule
from tests.integration.deployment_harness import Consortium, consortium_session

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

#: What a few seeds' schedules do (make_schedule(seed).describe()).
SCHEDULES = {
    62: "kill the SuperLink 2.7 s after round 0's checkpoint, the restarted run's ServerApp "
    "7.8 s later, then silo hospital-a 3.0 s after round 1's checkpoint",
    4: "kill the ServerApp 1.4 s after round 1's checkpoint",
}
#: The seeds CI runs (4: 144 s on a 2-core machine); FEDGUARD_CHAOS_SEEDS=62,4 (any
#: seeds) runs more. 62 passes too (201 s); it is left out only for the suite's time.
SEEDS = [int(s) for s in os.environ.get("FEDGUARD_CHAOS_SEEDS", "4").split(",") if s.strip()]
WALL_LIMIT_S = 360.0  # generous: on a loaded 2-core machine a round can take a minute


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    """One consortium for the module; each schedule gets new silo state folders."""
    with consortium_session(tmp_path_factory.mktemp("chaos"), CHAOS_BUDGET) as c:
        yield c


@pytest.mark.timeout(WALL_LIMIT_S + 300)  # + the silos' restarts and the checks
@pytest.mark.parametrize("seed", SEEDS)
def test_a_seeded_kill_schedule_keeps_every_invariant(consortium: Consortium, seed: int) -> None:
    schedule = make_schedule(seed)
    result = run_schedule(consortium, schedule, wall_limit_s=WALL_LIMIT_S)
    print(result.report())
    assert result.kills_fired > 0, f"seed {seed}: no kill fired\n{result.report()}"
    assert result.ok, (
        f"chaos seed {seed}: invariants failed: "
        f"{', '.join(c.name for c in result.failed)}\n{result.report()}"
    )
