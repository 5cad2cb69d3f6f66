"""Chaos harness: a short deployed run under a seeded random schedule of SIGKILLs.

A real consortium on 127.0.0.1 (tests/integration/deployment_harness.py: CA,
SuperLink, three SuperNodes with the warm executor) runs one short DP run
(3 silos, ``rounds`` rounds, breast cancer, a 16-unit MLP: a round takes
seconds). A schedule drawn from ``random.Random(seed)`` (:func:`make_schedule`)
kills, one after another:

* ``superlink``: the SuperLink and everything under it (SuperExec, ServerApp);
  restarted with ``fedguard server start`` (same database), then the run with
  ``fedguard run CONFIG --server-dir server --wait`` again;
* ``serverapp``: the ServerApp process only (``flwr-serverapp``); the run is
  started again with the same ``fedguard run ... --wait``;
* ``silo:NAME``: the silo's SuperNode, its warm executor and their children;
  restarted at once with the same ``fedguard client start`` (with
  ``--activation-retry``: Flower refuses the key until it has marked the dead
  node offline, two missed 30 s heartbeats), while the run goes on.

Each kill fires either a random delay after the previous step (the run's start or
the previous restart), or a random delay after round k's checkpoint was saved.
The schedule stops when the run ends (its ``--wait`` returns) or at a wall-clock
limit. Then the invariants (:func:`check_invariants`):

* ``audit-verify``: ``fedguard audit verify`` passes on the server's log;
* ``rounds-once``: every round of the run (each checkpointed round; 1..N for a
  completed run) is in the signed audit log exactly once, and in history.json once;
* ``ledger=silo-log`` (each silo): every charge in the silo's privacy ledger is
  in its signed silo log with the same ε, and the reverse
  (:func:`ledger_log_mismatches`, the one place to tighten when the ledger's
  head is bound to the log);
* ``within-budget`` (each silo): lifetime ε ≤ the silo's budget;
* ``outcome-reported``: the run completed (audit ``run-end`` ``completed``,
  ``--wait`` exit 0, every round done), or its last ``run-end`` says why not
  (a status other than completed, with a reason; ``--wait`` non-zero);
* ``one-serverapp``: one ServerApp at a time runs the run (holds its folder's
  ``serverapp.lock``; sampled every 0.5 s: Flower launches again a ServerApp
  killed while it was starting, beside the one the restarted ``fedguard run``
  started), and none still running once the run's ``--wait`` returned;
* ``attempts-ended``: every attempt of the run (each ``run-start``) has a
  ``run-end``, a killed one included (recorded when the next attempt starts), and
  the run's last record is a ``run-end``.

:class:`ChaosResult` prints the seed, the schedule, what happened when (seconds
from the schedule's start), the outcome and each invariant.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedguard.audit.chain import read_records
from fedguard.audit.logs import SILO_LOG_NAME
from fedguard.core.config import PrivacyBudget
from fedguard.core.process_lock import lock_holders
from fedguard.deploy.run_lock import RUN_LOCK
from fedguard.privacy.ledger import PrivacyLedger
from tests.integration.deployment_harness import (
    SILOS,
    Consortium,
    _alive,
    _cmdline,
    _descendants,
    _kill,
    _read_pid,
    write_config,
)

#: The silos' budget in a chaos run (each schedule gets new silo state). Small, so that
#: σ is large and each charge's PLD accounting cheap (≈ 1/2 the CPU of ε = 3).
CHAOS_BUDGET = PrivacyBudget(1.0, 1e-5)
ROUNDS = 3
TARGETS = ("superlink", "serverapp", "silo")
#: How long ``client start`` may keep retrying a refused activation after a kill.
SILO_RESTART_RETRY_S = 240.0
#: How long the ServerApp waits for a silo's reply (the run's ``reply-timeout``). A
#: SuperNode that lost its run in a SuperLink restart may never answer the resumed
#: one; with the default 900 s the run would outlive the schedule's wall limit
#: instead of going on without that silo (seeds 12 and 33 once did).
REPLY_TIMEOUT_S = 45
#: Relative slack when comparing an ε copied through JSON with the ledger's.
_EPS_TOLERANCE = 1e-9


# -- schedules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: ``target`` once ``after_checkpoint``'s round is saved (None: once the
    previous step is done), plus ``delay_s``."""

    target: str  # "superlink", "serverapp" or "silo:<name>"
    after_checkpoint: int | None
    delay_s: float

    def describe(self) -> str:
        when = (
            f"{self.delay_s:.1f} s after the previous step"
            if self.after_checkpoint is None
            else f"{self.delay_s:.1f} s after round {self.after_checkpoint}'s checkpoint"
        )
        return f"kill {self.target} {when}"


@dataclass(frozen=True)
class Schedule:
    seed: int
    rounds: int
    kills: tuple[Kill, ...]

    def describe(self) -> str:
        lines = [f"schedule seed={self.seed} rounds={self.rounds} kills={len(self.kills)}"]
        lines += [f"  {i + 1}. {k.describe()}" for i, k in enumerate(self.kills)]
        return "\n".join(lines)


def make_schedule(
    seed: int,
    rounds: int = ROUNDS,
    silos: Sequence[str] = SILOS,
    max_kills: int = 3,
    max_delay_s: float = 20.0,
) -> Schedule:
    """A random schedule of 1..``max_kills`` kills, drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    kills = []
    for _ in range(rng.randint(1, max_kills)):
        kind = rng.choice(TARGETS)
        target = f"silo:{rng.choice(list(silos))}" if kind == "silo" else kind
        if rng.random() < 0.5:
            kills.append(Kill(target, rng.randrange(rounds), round(rng.uniform(0.0, 3.0), 1)))
        else:
            kills.append(Kill(target, None, round(rng.uniform(1.0, max_delay_s), 1)))
    return Schedule(seed, rounds, tuple(kills))


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ChaosResult:
    schedule: Schedule
    run: str
    events: list[tuple[float, str]] = field(default_factory=list)
    kills_fired: int = 0
    wait_status: str = ""  # the last `fedguard run --wait`'s status line ("" if none)
    wait_returncode: int | None = None
    timed_out: bool = False
    rounds_completed: int = 0
    # ServerApps still running 5 s after the run's --wait returned (PID: command line).
    leftover_serverapps: dict[int, str] = field(default_factory=dict)
    # The most ServerApps seen running at once (sampled every 0.5 s), and their PIDs.
    concurrent_serverapps: list[int] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def outcome(self) -> str:
        if self.timed_out:
            return "timeout"
        return self.wait_status or "no status"

    def report(self) -> str:
        lines = [self.schedule.describe(), f"run {self.run}: what happened (s from start)"]
        lines += [f"  {t:7.1f}  {text}" for t, text in self.events]
        lines.append(
            f"outcome: {self.outcome} (exit {self.wait_returncode}), rounds completed "
            f"{self.rounds_completed}/{self.schedule.rounds}, kills fired {self.kills_fired}, "
            f"{self.seconds:.0f} s"
        )
        lines.append("invariants:")
        lines += [
            f"  {'OK    ' if c.ok else 'FAILED'} {c.name}" + (f": {c.detail}" if c.detail else "")
            for c in self.checks
        ]
        return "\n".join(lines)


# -- the ledger against the silo log -----------------------------------------------------------


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_EPS_TOLERANCE, abs_tol=1e-12)


def _logged_epsilon(payload: dict[str, Any]) -> float | None:
    for key in ("epsilon_after", "epsilon"):
        value = payload.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _logs_charge(kind: str, payload: dict[str, Any], entry: Any) -> bool:
    """Whether one silo-log record shows ``entry`` (a ledger charge) with its ε."""
    if payload.get("run_id") != entry.run_id or payload.get("round") != entry.round:
        return False
    epsilon = _logged_epsilon(payload)
    if epsilon is None or not _close(epsilon, entry.epsilon_after):
        return False
    purpose = str(entry.purpose)
    if kind == "ledger":  # the charge itself, committed to the chain
        return "charge" in str(payload.get("event", "")) and payload.get("purpose") in (
            None,
            purpose,
        )
    if kind == "sent" and purpose == "training":  # the update it paid for, sent
        return str(payload.get("message_type", "")).startswith("train") and payload.get(
            "status"
        ) in ("ok", "replayed")
    return False


def ledger_log_mismatches(state: Path, silo_id: str, budget: PrivacyBudget) -> list[str]:
    """Where a silo's privacy ledger and its signed silo log disagree (empty: they agree).

    * every charge in the ledger (any purpose) is in the silo log with the same ε
      after it: a ``ledger`` record of the charge, or (training) the ``sent``
      record of the update it paid for;
    * every update the log says was sent (``train*``, ``ok`` or ``replayed``) has
      its charge in the ledger;
    * the log never records more ε than the ledger holds.

    Kept in one function so that it can be tightened (the ledger's head hash in
    the log's ``ledger`` records) once the ledger is bound to the log.
    """
    problems: list[str] = []
    try:
        with PrivacyLedger.open(state, silo_id, budget) as ledger:
            entries = ledger.entries()
            spent = ledger.spent_epsilon()
    except Exception as failed:
        return [f"the ledger cannot be read: {type(failed).__name__}: {failed}"]
    log = state / SILO_LOG_NAME
    try:
        records = [(r.kind, r.payload) for r in read_records(log)] if log.exists() else []
    except Exception as failed:
        return [f"the silo log cannot be read: {type(failed).__name__}: {failed}"]
    for e in entries:
        if not any(_logs_charge(kind, payload, e) for kind, payload in records):
            problems.append(
                f"ledger charge #{e.entry_id} ({e.purpose}, run {e.run_id!r} round {e.round}, "
                f"ε after {e.epsilon_after:.6g}, {e.status}) is not in the silo log"
            )
    charged = {(e.run_id, e.round) for e in entries if str(e.purpose) == "training"}
    for kind, payload in records:
        if (
            kind == "sent"
            and str(payload.get("message_type", "")).startswith("train")
            and payload.get("status") in ("ok", "replayed")
            and (_logged_epsilon(payload) or 0.0) > 0
            and (payload.get("run_id"), payload.get("round")) not in charged
        ):
            problems.append(
                f"the silo log says round {payload.get('round')} of run "
                f"{payload.get('run_id')!r} was sent ({payload.get('status')}) but the ledger "
                "holds no training charge for it"
            )
    logged = [eps for _, p in records if (eps := _logged_epsilon(p)) is not None]
    if logged and max(logged) > spent and not _close(max(logged), spent):
        problems.append(f"the silo log records ε={max(logged):.6g}, the ledger only {spent:.6g}")
    return problems


# -- running a schedule ------------------------------------------------------------------------


class _Driver:
    """Runs one schedule on a consortium: kills, restarts, the run's ``--wait``."""

    def __init__(self, c: Consortium, schedule: Schedule, run: str, wall_limit_s: float) -> None:
        self.c = c
        self.schedule = schedule
        self.run = run
        self.config = write_config(
            c.root, run, schedule.rounds, (f"reply-timeout = {REPLY_TIMEOUT_S}",)
        )
        self.result = ChaosResult(schedule, run)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + wall_limit_s
        self.logs = c.root / "chaos-logs"
        self.logs.mkdir(exist_ok=True)
        self.waiter: subprocess.Popen[bytes] | None = None
        self.waiter_log: Path | None = None
        self.attempt = 0
        self.silo_restarts: dict[str, threading.Thread] = {}
        self.ended = False
        self.observed = 0.0

    def observe(self) -> None:
        """Sample the running ServerApps (every 0.5 s): two at once is a finding."""
        if time.monotonic() - self.observed < 0.5:
            return
        self.observed = time.monotonic()
        # Running the run = holding its lock: a ServerApp Flower launches again is a
        # process for a few seconds (imports) before it finds the lock taken and exits.
        lock = self.c.server.runs / self.run / RUN_LOCK
        apps = sorted(p for p in lock_holders(lock) if "flwr-serverapp" in _cmdline(p))
        if len(apps) > max(1, len(self.result.concurrent_serverapps)):
            self.result.concurrent_serverapps = apps
            self.event(f"{len(apps)} ServerApps running at once: PIDs {apps}")

    # -- bookkeeping

    def event(self, text: str) -> None:
        self.result.events.append((time.monotonic() - self.t0, text))

    @property
    def checkpoints(self) -> Path:
        return self.c.server.runs / self.run / "checkpoints"

    def checkpointed(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.checkpoints.glob("round-*.json"))

    # -- the run

    def start_run(self) -> None:
        self.attempt += 1
        self.waiter_log = self.logs / f"{self.run}-wait-{self.attempt}.log"
        self.waiter = self.c.launch(
            "run", self.config.name, "--server-dir", "server", "--wait", log=self.waiter_log
        )
        self.event(f"fedguard run {self.config.name} --wait (attempt {self.attempt})")

    def drop_waiter(self) -> None:
        """The current ``--wait`` lost its run (we killed the server side): end it."""
        if self.waiter is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.waiter.wait(timeout=3)
        if self.waiter.poll() is None:
            self.waiter.kill()
            self.waiter.wait()
        self.waiter = None

    def poll_run_end(self) -> bool:
        """True once the run's ``--wait`` returned on its own (the run ended)."""
        if self.waiter is None or self.waiter.poll() is None:
            return False
        assert self.waiter_log is not None
        text = self.waiter_log.read_text(errors="replace")
        said = [
            line.split(": ", 1)[1]
            for line in text.splitlines()
            if line.startswith(f"run {self.run}: ") and "Flower run" not in line
        ]
        # Flower's status ("finished:completed", ...), then (newer) the audit's outcome.
        flower = [line for line in said if line.startswith("finished")]
        self.result.wait_status = (flower or said or [""])[-1].split(" (", 1)[0]
        status = said
        self.result.wait_returncode = self.waiter.returncode
        tail = " | ".join(text.strip().splitlines()[-2:]) if not status else ""
        self.event(
            f"run --wait returned {self.waiter.returncode}: "
            f"{' / '.join(said) or 'no status line'}" + (f" ({tail})" if tail else "")
        )
        self.waiter = None
        self.ended = True
        return True

    # -- waiting

    def sleep_or_end(self, seconds: float) -> bool:
        """Sleep ``seconds``; False if the run ended or the wall-clock limit came first."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self.poll_run_end() or time.monotonic() >= self.deadline:
                return False
            self.observe()
            time.sleep(0.1)
        return True

    def wait_for_checkpoint(self, k: int) -> bool:
        while k not in self.checkpointed():
            if self.poll_run_end() or time.monotonic() >= self.deadline:
                return False
            self.observe()
            time.sleep(0.1)
        return True

    # -- kills and restarts

    def link_pid(self) -> int | None:
        pid = _read_pid(self.c.server.pid_file)
        return pid if pid is not None and _alive(pid) else None

    def serverapps(self) -> set[int]:
        link = self.link_pid()
        if link is None:
            return set()
        return {p for p in _descendants({link}) if "flwr-serverapp" in _cmdline(p)}

    def kill_superlink(self) -> None:
        link = self.link_pid()
        everything = ({link} | _descendants({link})) if link is not None else set()
        _kill(everything)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in everything) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.event(f"SIGKILL superlink: SuperLink {link} and {len(everything) - 1} below it")
        self.drop_waiter()
        self.c.start_server()  # same database; the SuperNodes reconnect on their own
        self.event(f"fedguard server start: SuperLink {self.link_pid()}")
        self.start_run()

    def kill_serverapp(self) -> bool:
        """Kill the ServerApp (waiting for one to run, as a run just restarted has none)."""
        while not (apps := self.serverapps()):
            if self.poll_run_end() or time.monotonic() >= self.deadline:
                self.event("kill serverapp not fired: no ServerApp ran before the run ended")
                return False
            time.sleep(0.1)
        _kill(apps)
        self.event(f"SIGKILL serverapp: PID(s) {sorted(apps)}")
        self.drop_waiter()
        self.start_run()
        return True

    def kill_silo(self, name: str) -> None:
        pending = self.silo_restarts.get(name)
        if pending is not None and pending.is_alive():
            self.event(f"{name} is still restarting; waiting for it before the kill")
            pending.join(timeout=SILO_RESTART_RETRY_S + 60)
        state = self.c.silos[name]
        roots = {
            pid
            for f in ("supernode.pid", "executor.pid")
            if (pid := _read_pid(state / f)) is not None and _alive(pid)
        }
        everything = roots | _descendants(roots)
        _kill(everything)
        below = len(everything) - len(roots)
        self.event(f"SIGKILL silo:{name}: PIDs {sorted(roots)} and {below} below them")

        def restart() -> None:
            started = time.monotonic()
            done = self.c.start_silo(name, state, SILO_RESTART_RETRY_S)
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            why = "" if done.returncode == 0 else f" ({last[0]})"
            took = time.monotonic() - started
            self.event(
                f"fedguard client start {name}: exit {done.returncode} after {took:.0f} s{why}"
            )

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        self.silo_restarts[name] = thread

    def fire(self, kill: Kill) -> None:
        if kill.target == "superlink":
            self.kill_superlink()
        elif kill.target == "serverapp":
            if not self.kill_serverapp():
                return
        else:
            self.kill_silo(kill.target.split(":", 1)[1])
        self.result.kills_fired += 1

    # -- the schedule

    def drive(self) -> ChaosResult:
        self.start_run()
        for kill in self.schedule.kills:
            if self.ended:
                self.event(f"not fired (the run had ended): {kill.describe()}")
                continue
            if kill.after_checkpoint is not None and not self.wait_for_checkpoint(
                kill.after_checkpoint
            ):
                self.event(f"not fired: {kill.describe()}")
                continue
            if not self.sleep_or_end(kill.delay_s):
                self.event(f"not fired: {kill.describe()}")
                continue
            self.fire(kill)
        while not self.ended and time.monotonic() < self.deadline:
            self.poll_run_end()
            self.observe()
            time.sleep(0.2)
        if not self.ended:
            self.result.timed_out = True
            self.event("wall-clock limit reached: the run did not end")
            self.drop_waiter()
            apps = self.serverapps()
            _kill(apps)  # so the run does not go on under the next schedule
            self.event(f"cleanup: SIGKILL ServerApp PID(s) {sorted(apps)}")
        else:
            deadline = time.monotonic() + 5  # the last ServerApp exits as its run ends
            while (apps := self.serverapps()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if apps:
                self.result.leftover_serverapps = {p: _cmdline(p)[-60:] for p in sorted(apps)}
                _kill(apps)  # so it does not go on under the next schedule
                self.event(
                    f"ServerApp(s) still running after the run ended: {sorted(apps)}; killed"
                )
        for name, thread in self.silo_restarts.items():
            thread.join(timeout=SILO_RESTART_RETRY_S + 60)
            if thread.is_alive():
                self.event(f"{name}: its restart did not finish")
        self.event("schedule done; checking invariants")
        self.result.rounds_completed = max([0, *self.checkpointed()])
        return self.result


def run_schedule(c: Consortium, schedule: Schedule, wall_limit_s: float = 240.0) -> ChaosResult:
    """Run ``schedule`` on ``c`` (new silo state first), then check the invariants."""
    run = f"chaos-{schedule.seed}"
    c.fresh_silos(str(schedule.seed))  # a new life for the silos: new ledgers, new budget
    driver = _Driver(c, schedule, run, wall_limit_s)
    result = driver.drive()
    result.checks = check_invariants(c, result)
    result.seconds = time.monotonic() - driver.t0
    return result


# -- the invariants ----------------------------------------------------------------------------


def _records(c: Consortium, run: str) -> list[tuple[str, dict[str, Any]]]:
    """The run's records in the audit log (a torn last line is skipped, not fatal)."""
    out = []
    path = c.server.audit_log
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("payload", {}).get("run_id") == run:
            out.append((str(record["kind"]), record["payload"]))
    return out


def _reason(payload: dict[str, Any]) -> str:
    """Why a run ended other than completed: a reason field, or the text after the status."""
    for key in ("reason", "reasons", "details", "error"):
        value = payload.get(key)
        if value:
            return str(value)
    status = str(payload.get("status", ""))
    return status.split(":", 1)[1].strip() if ":" in status else ""


def check_invariants(c: Consortium, result: ChaosResult) -> list[Check]:
    """The invariants of the module docstring, after ``result``'s schedule ran on ``c``."""
    run, rounds = result.run, result.schedule.rounds
    checks = []

    verify = c.fedguard(
        "audit", "verify", str(c.server.audit_log), "--public-key",
        str(c.server.audit_public_key), check=False,
    )  # fmt: skip
    text = (verify.stdout + verify.stderr).strip().replace("\n", " | ")
    checks.append(Check("audit-verify", verify.returncode == 0 and "OK" in verify.stdout, text))

    records = _records(c, run)
    audited = Counter(int(p["round"]) for kind, p in records if kind == "round")
    done = [k for k in result_checkpoints(c, run) if k > 0]
    ends = [p for kind, p in records if kind == "run-end"]
    last = ends[-1] if ends else None
    completed = result.wait_status == "finished:completed"
    said_completed = last is not None and last.get("status") == "completed"
    # A run that says it completed did every round; any run did each checkpointed round.
    expected = set(range(1, rounds + 1)) if said_completed else set(done)
    problems = [f"round {r} audited {n} times" for r, n in sorted(audited.items()) if n != 1]
    problems += [f"round {r} not audited" for r in sorted(expected - set(audited))]
    extra = set(audited) - expected - set(done)
    problems += [f"round {r} audited but never checkpointed" for r in sorted(extra)]
    history_file = c.server.runs / run / "history.json"
    if history_file.exists():
        seen = Counter(int(r["round"]) for r in json.loads(history_file.read_text()))
        problems += [f"round {r} in history.json {n} times" for r, n in seen.items() if n != 1]
    checks.append(
        Check("rounds-once", not problems, "; ".join(problems) or f"rounds {sorted(audited)}")
    )

    over = []
    for name, state in c.silos.items():
        mismatches = ledger_log_mismatches(state, name, c.budget)
        checks.append(Check(f"ledger=silo-log[{name}]", not mismatches, "; ".join(mismatches)))
        try:
            with PrivacyLedger.open(state, name, c.budget) as ledger:
                spent = ledger.spent_epsilon()
        except Exception as failed:
            over.append(f"{name}: ledger unreadable ({type(failed).__name__}: {failed})")
            continue
        if spent > c.budget.epsilon + 1e-9:
            over.append(f"{name}: ε={spent:.6g} > budget {c.budget.epsilon:g}")
    checks.append(Check("within-budget", not over, "; ".join(over)))

    if result.timed_out:
        outcome = (False, "the run did not end within the wall-clock limit")
    elif last is None:
        outcome = (False, f"no run-end record (--wait: {result.outcome})")
    elif said_completed:
        missing = sorted(set(range(1, rounds + 1)) - set(done))
        ok = completed and result.wait_returncode == 0 and not missing
        outcome = (
            ok,
            "completed"
            if ok
            else f"run-end says completed, but --wait: {result.outcome} "
            f"(exit {result.wait_returncode}), rounds not done: {missing}",
        )
    else:
        why = _reason(last)
        ok = bool(why) and result.wait_returncode not in (0, None)
        outcome = (
            ok,
            f"run-end {last.get('status')!r}: {why or 'no reason given'}; --wait: "
            f"{result.outcome} (exit {result.wait_returncode})",
        )
    checks.append(Check("outcome-reported", *outcome))

    # One ServerApp at a time on the run (sampled while it ran), none left once it ended.
    kinds = [kind for kind, _ in records if kind in ("run-start", "run-end")]
    together, leftover = result.concurrent_serverapps, result.leftover_serverapps
    problems = []
    if together:
        problems.append(f"{len(together)} ServerApps ran the run at once (PIDs {together})")
    if leftover:
        problems.append(f"ServerApp PID(s) {sorted(leftover)} still ran after the run ended")
    checks.append(Check("one-serverapp", not problems, "; ".join(problems)))

    # Every attempt (each run-start) has its run-end, a killed one included (written
    # when the next attempt starts), and the log ends on one.
    starts, ended = kinds.count("run-start"), kinds.count("run-end")
    sequence = " ".join("S" if kind == "run-start" else "E" for kind in kinds)
    checks.append(
        Check(
            "attempts-ended",
            starts == ended and kinds[-1:] == ["run-end"],
            f"{starts} run-start, {ended} run-end (S/E in log order: {sequence or 'none'})",
        )
    )
    return checks


def result_checkpoints(c: Consortium, run: str) -> list[int]:
    folder = c.server.runs / run / "checkpoints"
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("round-*.json"))
