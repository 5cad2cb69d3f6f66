"""``fedguard monitor``: drift monitoring rounds against a finished simulated run.

``fedguard simulate``'s trust-layer options are generated from
:data:`fedguard.core.run_options.RUN_OPTIONS`.

Heavy imports (torch, Flower) happen inside the handler, so ``fedguard --help``
stays light.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedguard.runs.layout import RunFolder, VariantFolder

__all__ = ["add_monitor_command", "cmd_monitor"]


def add_monitor_command(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "monitor",
        help="drift monitoring rounds against a finished simulated run",
        description=(
            "Run drift monitoring rounds against a finished run variant (in process): each "
            "silo histograms its inputs on the training-time bins with DP noise, SecAgg+ sums "
            "them, the server compares with the reference (PSI, Jensen-Shannon) and alerts "
            "per feature. Results go to the variant's trust.json and trust-log.jsonl."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run variant folder (RUN/dp or RUN/no-dp), or RUN")
    p.add_argument("--rounds", type=int, default=1, help="monitoring rounds to run")
    p.add_argument(
        "--drift-silos",
        default="",
        metavar="I,J",
        help="simulation: indices of silos whose inputs drift",
    )
    p.add_argument(
        "--drift-shift", type=float, default=1.0, help="drift size, in standard deviations"
    )
    p.add_argument(
        "--drift-features",
        default="",
        metavar="NAMES",
        help="features that drift (comma-separated; default: every standardized feature)",
    )
    p.add_argument(
        "--drift-start", type=int, default=1, help="first monitoring round (1-based) with drift"
    )
    p.add_argument("--threshold", type=float, default=None, help="PSI alert threshold")
    p.set_defaults(handler=cmd_monitor)


def _variant(folder: Path) -> Path:
    if VariantFolder(folder).has_checkpoints():
        return folder
    variants = RunFolder(folder).variants_present()
    return folder / variants[0] if variants else folder


def cmd_monitor(args: argparse.Namespace) -> int:
    """``fedguard monitor``: drift monitoring rounds against a finished run variant."""
    from fedguard.simulation.monitor import simulate_monitoring
    from fedguard.trust.phase import alerts_summary

    silos = [int(s) for s in str(args.drift_silos).split(",") if s.strip()]
    features = [f.strip() for f in str(args.drift_features).split(",") if f.strip()]
    run_dir = _variant(Path(args.run))
    results = simulate_monitoring(
        run_dir,
        rounds=args.rounds,
        drift_silos=silos,
        shift=args.drift_shift if silos else 0.0,
        features=features or None,
        start=args.drift_start,
        threshold=args.threshold,
    )
    first_alert = None
    for index, result in enumerate(results, start=1):
        print(alerts_summary(result))
        if first_alert is None and result.alerts and index >= args.drift_start:
            first_alert = index
    if silos:
        if first_alert is None:
            print(f"drift injected from round {args.drift_start}: not detected")
        else:
            delay = first_alert - args.drift_start + 1
            print(
                f"drift injected from round {args.drift_start}: first alert in round "
                f"{first_alert} ({delay} round(s) after it began)"
            )
    print(f"results: {run_dir / 'trust.json'}, {run_dir / 'trust-log.jsonl'}")
    return 0
