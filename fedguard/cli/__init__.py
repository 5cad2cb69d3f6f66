"""The ``fedguard`` command line: :func:`main` and :func:`build_parser`.

One module per command group, each adding its subcommands to the parser:
:mod:`~fedguard.cli.simulate` (``simulate``), :mod:`~fedguard.cli.edge`
(``export``, ``predict``), :mod:`~fedguard.cli.explain` (``explain``),
:mod:`~fedguard.cli.monitor` (``monitor``), :mod:`~fedguard.cli.contract`
(``contract infer | check | show``) and :mod:`~fedguard.cli.deploy`
(``ca``, ``node``, ``server``, ``client``, ``run``, ``audit``, ``models``).
Every subcommand sets one handler, ``parser.set_defaults(handler=cmd_x)``;
:func:`main` runs ``args.handler(args)``, whose return value is the exit status.

Imports stay free of torch, pandas and Flower until a handler runs: ``fedguard
predict`` must run where only numpy and onnxruntime are installed, and importing
this package loads no command group (:func:`build_parser` does).

Every option of ``fedguard simulate`` can also live in a TOML file
(``--config run.toml``) under the same name without the leading dashes; flags
given on the command line win over the file. Errors print one line, no
traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fedguard.core.errors import FedguardError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fedguard`` parser, every command group mounted (in ``fedguard --help`` order)."""
    from fedguard.cli import contract, deploy, edge, explain, monitor, simulate

    parser = argparse.ArgumentParser(
        prog="fedguard",
        description="fedguard: federated learning for regulated industries.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    simulate.add_simulate_command(sub)
    edge.add_export_command(sub)
    edge.add_predict_command(sub)
    explain.add_explain_command(sub)
    monitor.add_monitor_command(sub)
    contract.add_contract_command(sub)
    deploy.add_deploy_commands(sub)
    return parser


class _DropKnownFlowerNotices(logging.Filter):
    """Flower warns that ``run_simulation`` is deprecated in favour of ``flwr run``.

    fedguard uses it on purpose: ``flwr run`` installs app dependencies and rewrites
    the project's pyproject.toml, which a library must not do to its users.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_flower_logs() -> None:
    flower = logging.getLogger("flwr")
    flower.setLevel(logging.WARNING)
    flower.propagate = False  # Flower has its own console handler; no second copy
    for handler in flower.handlers:
        handler.addFilter(_DropKnownFlowerNotices())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``fedguard`` command; its exit status (2, one line on stderr, on an error)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_flower_logs()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except FedguardError as error:
        print(f"fedguard: error: {error}", file=sys.stderr)
        return 2
