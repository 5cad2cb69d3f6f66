"""``fedguard audit verify`` and ``fedguard models ...``: the server's records, read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedguard.core.errors import ConfigError

if TYPE_CHECKING:
    from fedguard.audit.registry import ModelRegistry

__all__ = ["list_models", "parse_head", "rollback_model", "show_model", "verify_log"]


def parse_head(text: str | None) -> tuple[int, str] | None:
    """``--expect-head SEQ:SHA256`` as ``(seq, sha256)`` (None if not given)."""
    if text is None:
        return None
    seq, sep, sha = text.partition(":")
    if not sep or not seq.isdigit() or len(sha) != 64:
        raise ConfigError(f"--expect-head is SEQ:SHA256, got {text!r}")
    return int(seq), sha.lower()


def verify_log(
    log: str | Path, public_key: Path | None, expect_head: str | None, silo: bool
) -> int:
    """Verify a server audit log (or, ``silo``, a silo's log): 0 if intact, 1 if not.

    ``log`` is printed as given (the path as the user wrote it)."""
    from fedguard.audit.logs import verify_silo_log
    from fedguard.audit.pki import load_public_key
    from fedguard.audit.server_log import verify_audit_log

    key = load_public_key(public_key) if public_key else None
    head = parse_head(expect_head)
    if silo:
        report = verify_silo_log(Path(log), key, expected_head=head)
    else:
        if key is None:
            raise ConfigError("verifying a server audit log needs --public-key (audit.pub)")
        report = verify_audit_log(Path(log), key, expected_head=head)
    print(f"{log}: {report.summary()}")
    return 0 if report.ok else 1


def list_models(registry: ModelRegistry, run: str | None) -> None:
    """Print the registered models, ``*`` marking each run's head."""
    records = registry.list(run)
    if not records:
        print("no models registered")
    for r in records:
        metrics = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sorted(r.metrics.items())
            if isinstance(v, (int, float))
        )
        mark = "*" if r.is_head else " "
        parent = r.parent_sha256[:12] if r.parent_sha256 else "-" * 12
        print(f"{mark} {r.sha256[:12]}  parent {parent}  {r.run_id}  round {r.round:>3}  {metrics}")


def show_model(registry: ModelRegistry, model_hash: str, run: str | None) -> None:
    """Print one model's record and its lineage as JSON."""
    record = registry.get(model_hash, run)
    lineage = [m.sha256 for m in registry.lineage(record.sha256, record.run_id)]
    print(json.dumps({**record.to_dict(), "lineage": lineage}, indent=2))


def rollback_model(registry: ModelRegistry, model_hash: str, run: str | None, reason: str) -> None:
    """Make a model its run's head again (recorded in the registry)."""
    record = registry.rollback(model_hash, run, reason)
    print(f"run {record.run_id}: head is now {record.sha256[:12]} (round {record.round})")
