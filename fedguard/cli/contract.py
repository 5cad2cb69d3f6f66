"""``fedguard contract``: draft, show and check the consortium's data contract, locally.

- ``contract infer DATA --label COL [--name N] [--out FILE]``: draft a contract from a
  silo's own table, printing what it guessed; people edit it and sign off.
- ``contract check DATA --contract FILE``: validate a table against a contract and
  print the report (the silo's own; nothing is sent anywhere). Exit 1 if it fails.
- ``contract show FILE``: the parsed contract, its hash and the features it encodes.

DATA is a CSV or Parquet path, or ``--url URL --query SQL`` for a database.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_contract_command"]


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", type=Path, help="CSV or Parquet file")
    parser.add_argument("--url", help="SQLAlchemy database URL (instead of DATA)")
    parser.add_argument("--query", default="", help="SQL query giving the table (with --url)")


def _source(args: argparse.Namespace) -> Any:
    from fedguard.core.data_sources import DataSource
    from fedguard.core.errors import ConfigError

    if (args.data is None) == (args.url is None):
        raise ConfigError("give one table: a DATA file, or --url with --query")
    if args.url is not None:
        return DataSource.sql(args.url, args.query)
    return DataSource.file(args.data)


def cmd_infer(args: argparse.Namespace) -> int:
    from fedguard.core.contract import contract_to_toml
    from fedguard.core.contract_inference import infer_contract
    from fedguard.core.data_sources import read_table

    source = _source(args)
    frame = read_table(source)
    name = args.name or (args.data.stem if args.data is not None else "contract")
    inferred = infer_contract(
        frame, args.label, name, drop=tuple(args.drop), max_categories=args.max_categories
    )
    print(f"drafted data contract {name!r} from {source.describe()} ({len(frame)} rows):")
    for note in inferred.notes:
        print(f"  {note}")
    header = [
        f"Draft data contract {name!r}, inferred from one silo's table by fedguard contract",
        "infer. Edit it (ranges, categories, units, protected attributes, leaking columns)",
        "and have the consortium sign off before any silo trains on it.",
    ]
    text = contract_to_toml(inferred.contract, header)
    if args.out is None:
        sys.stdout.write(text)
    else:
        if args.out.exists() and not args.force:
            from fedguard.core.errors import ConfigError

            raise ConfigError(f"{args.out} exists; pass --force to overwrite it")
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out} (sha256 {inferred.contract.content_hash()})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from fedguard.core.contract import load_contract
    from fedguard.core.contract_validation import validate_frame
    from fedguard.core.data_sources import read_table

    contract = load_contract(args.contract)
    report = validate_frame(contract, read_table(_source(args)))
    print(report.summary())
    for violation in report.violations:
        if violation.examples:
            print(f"    e.g. {', '.join(violation.examples)}  [{violation.column}]")
    if args.report is not None:
        args.report.write_text(report.to_json(), encoding="utf-8")
        print(f"wrote {args.report}")
    return 0 if report.ok else 1


def cmd_show(args: argparse.Namespace) -> int:
    from fedguard.core.contract import load_contract
    from fedguard.core.datasets import column_feature_names

    contract = load_contract(args.contract)
    label = contract.label
    print(f"data contract {contract.name!r} version {contract.version}")
    print(f"  sha256 {contract.content_hash()}")
    print(f"  label {label.column!r}: {label.task.value} {list(label.classes) or ''}".rstrip())
    for column in contract.columns:
        features = column_feature_names(column)
        print(f"  {column.name!r}: {column.type.value} -> {len(features)} feature(s)")
    for dropped in contract.dropped:
        print(f"  dropped {dropped.name!r}: {dropped.reason}")
    if contract.protected:
        print(f"  protected attributes: {list(contract.protected)}")
    return 0


def add_contract_command(sub: Any) -> None:
    """Mount ``contract infer | check | show``."""
    parser = sub.add_parser("contract", help="draft, show and check a data contract (locally)")
    commands = parser.add_subparsers(dest="contract_command", required=True, metavar="ACTION")
    infer = commands.add_parser("infer", help="draft a contract from a silo's own table")
    _add_source(infer)
    infer.add_argument("--label", required=True, help="the label column")
    infer.add_argument("--name", help="the contract's name (default: the file's stem)")
    infer.add_argument("--drop", action="append", default=[], help="a column to drop (repeat)")
    infer.add_argument("--max-categories", type=int, default=30)
    infer.add_argument("--out", type=Path, help="write the TOML here (default: stdout)")
    infer.add_argument("--force", action="store_true", help="overwrite --out")
    infer.set_defaults(handler=cmd_infer)
    check = commands.add_parser("check", help="validate a table against a contract")
    _add_source(check)
    check.add_argument("--contract", type=Path, required=True)
    check.add_argument("--report", type=Path, help="also write the JSON report here")
    check.set_defaults(handler=cmd_check)
    show = commands.add_parser("show", help="a contract, its hash and its features")
    show.add_argument("contract", type=Path)
    show.set_defaults(handler=cmd_show)
