"""Per-round checkpoints, written atomically so a crash never leaves half a file.

Each completed round writes ``round-NNNN.npz`` (global weights and the feature
scaler) and ``round-NNNN.json`` (round number, metrics history, accountant
state). Files are written to a temporary name, fsynced and renamed; the JSON goes
last, so a round exists only once both files are whole.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.core.errors import CheckpointError, CheckpointStorageError
from fedguard.core.files import atomic_write_bytes, atomic_write_json, storage_error

_NAME = re.compile(r"^round-(\d{4,})\.json$")


@dataclass(frozen=True)
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save(self, round_number: int, arrays: Mapping[str, np.ndarray], state: Any) -> Path:
        if round_number < 0:
            raise CheckpointError(f"round must be >= 0, got {round_number}")
        buffer = io.BytesIO()
        payload: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
        np.savez(buffer, **payload)
        stem = self.directory / f"round-{round_number:04d}"
        # CheckpointStorageError (naming the file and the cause) if the disk fails;
        # the round then does not exist (its JSON, written last, is absent).
        atomic_write_bytes(
            stem.with_suffix(".npz"), buffer.getvalue(), error=CheckpointStorageError
        )
        atomic_write_json(
            stem.with_suffix(".json"),
            {"round": round_number, "state": state},
            error=CheckpointStorageError,
        )
        return stem.with_suffix(".json")

    def rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        try:
            names = [p.name for p in self.directory.iterdir()]
        except OSError as bad:
            raise storage_error(
                CheckpointStorageError, "cannot list checkpoints in", self.directory, bad
            ) from bad
        found = (_NAME.match(name) for name in names)
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, round_number: int) -> Checkpoint:
        stem = self.directory / f"round-{round_number:04d}"
        try:
            meta = json.loads(stem.with_suffix(".json").read_text())
            with np.load(stem.with_suffix(".npz")) as data:
                arrays = {k: data[k] for k in data.files}
        except OSError as bad:
            raise storage_error(
                CheckpointStorageError, "cannot read checkpoint", stem, bad
            ) from bad
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as bad:
            raise CheckpointError(f"checkpoint {stem} is unreadable: {bad}") from None
        return Checkpoint(int(meta["round"]), arrays, dict(meta["state"]))

    def latest(self) -> Checkpoint | None:
        rounds = self.rounds()
        return self.load(rounds[-1]) if rounds else None
