"""What a silo has sent, kept so a replayed round costs no privacy budget.

If the server crashes after a silo trained round r but before the server saved
round r, the resumed server sends round r again, from the same global model. The
silo must not train again (that would be a second, charged release), and need
not refuse: it answers with the very update it already released, which is
post-processing of a release already in its ledger. The outbox holds that
update, keyed by run and round, with the SHA-256 of the global model it was
trained from: a replay from a different model is refused. It also records how the
update left (``plain`` in a train reply, ``secure`` inside one SecAgg instance):
only a plain release is ever resent; an update that only the SecAgg sum saw is
never resent in clear, nor masked again in another instance.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.core.errors import LedgerError, OutboxStorageError
from fedguard.core.files import atomic_write_bytes, storage_error
from fedguard.core.serialization import ModelWeights

CHANNELS = ("plain", "secure")


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """A content hash of named float32 tensors (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, value in weights.items():
        array = np.ascontiguousarray(value)
        digest.update(name.encode() + b"\0" + str(array.shape).encode() + b"\0")
        digest.update(array.dtype.str.encode() + b"\0" + array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SentUpdate:
    global_sha256: str
    weights: ModelWeights
    metrics: dict[str, float]
    # "plain" (sent in clear in a train reply) or "secure" (encoded for one SecAgg
    # instance, never seen unmasked): only a plain release may be resent.
    channel: str = "plain"


class Outbox:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "outbox"

    def _path(self, run_id: str, round_number: int) -> Path:
        run_key = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        return self.directory / run_key / f"round-{round_number:05d}.npz"

    def save(
        self,
        run_id: str,
        round_number: int,
        global_sha256: str,
        weights: Mapping[str, np.ndarray],
        metrics: Mapping[str, float],
        channel: str = "plain",
    ) -> None:
        if channel not in CHANNELS:
            raise LedgerError(f"outbox channel must be one of {CHANNELS}, got {channel!r}")
        meta = json.dumps(
            {
                "channel": channel,
                "run_id": run_id,
                "round": round_number,
                "global_sha256": global_sha256,
                "metrics": dict(metrics),
                "names": list(weights),
            }
        )
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {f"w{i}": np.asarray(v) for i, v in enumerate(weights.values())}
        np.savez(
            buffer,
            meta=np.frombuffer(meta.encode(), dtype=np.uint8),
            **arrays,
        )
        # A failure (full disk, read-only folder) raises OutboxStorageError naming
        # the file and the cause; the entry is then absent, never half written.
        atomic_write_bytes(
            self._path(run_id, round_number), buffer.getvalue(), error=OutboxStorageError
        )

    def load(self, run_id: str, round_number: int) -> SentUpdate | None:
        path = self._path(run_id, round_number)
        if not path.exists():
            return None
        try:
            with np.load(path) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                weights: ModelWeights = OrderedDict(
                    (name, data[f"w{i}"]) for i, name in enumerate(meta["names"])
                )
        except OSError as bad:
            raise storage_error(OutboxStorageError, "cannot read outbox entry", path, bad) from bad
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as bad:
            raise LedgerError(f"outbox entry {path} is unreadable: {bad}") from None
        if meta["run_id"] != run_id or meta["round"] != round_number:
            raise LedgerError(f"outbox entry {path} belongs to another run or round")
        channel = str(meta.get("channel", "plain"))  # entries before channels were plain
        if channel not in CHANNELS:
            raise LedgerError(f"outbox entry {path} has an unknown channel {channel!r}")
        return SentUpdate(str(meta["global_sha256"]), weights, dict(meta["metrics"]), channel)
