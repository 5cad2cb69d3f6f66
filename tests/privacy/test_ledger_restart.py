"""The ledger survives a real process restart: one process charges, another reads."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedguard.core.config import PrivacyBudget
from fedguard.privacy.events import DpSgdRound
from fedguard.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

_CHARGE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fedguard.core.config import PrivacyBudget
    from fedguard.privacy.events import DpSgdRound
    from fedguard.privacy.ledger import PrivacyLedger
    ledger = PrivacyLedger.open(Path(sys.argv[1]), "h1", PrivacyBudget(5.0, 1e-5))
    ledger.charge("run", int(sys.argv[2]), DpSgdRound(0.05, 1.1, 20))
    print(ledger.spent_epsilon())
    # no close(): the process simply exits, as a crash after the charge would
    """
)


def test_charges_from_dead_processes_are_all_counted(tmp_path: Path) -> None:
    printed = []
    for round_number in (1, 2, 3):
        done = subprocess.run(
            [sys.executable, "-c", _CHARGE, str(tmp_path), str(round_number)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        printed.append(float(done.stdout.strip().splitlines()[-1]))
    assert printed[0] < printed[1] < printed[2]
    with PrivacyLedger.open(tmp_path, "h1", PrivacyBudget(5.0, 1e-5)) as ledger:
        assert [e.round for e in ledger.entries()] == [1, 2, 3]
        assert abs(ledger.spent_epsilon() - printed[-1]) < 1e-9
        expected = ledger.epsilon_if_charged(DpSgdRound(0.05, 1.1, 20))
        assert expected > printed[-1]
