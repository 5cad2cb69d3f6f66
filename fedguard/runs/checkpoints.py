"""Per-round checkpoints, written atomically so a crash never leaves half a file.

Each completed round writes ``round-NNNN.npz`` (global weights and the feature
scaler) and ``round-NNNN.json`` (round number, metrics history, accountant
state). Files are written to a temporary name, fsynced and renamed; the JSON goes
last, so a round exists only once both files are whole.

The array names are this module's contract: ``weights/<parameter>`` and
``scaler/mean``, ``scaler/scale``. Write with :meth:`CheckpointStore.save_model`,
read with :meth:`Checkpoint.weights` and :meth:`Checkpoint.scaler`; nothing else
spells the prefixes.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedguard.core.errors import CheckpointError, CheckpointStorageError, DataError
from fedguard.core.files import atomic_write_bytes, atomic_write_json, storage_error

if TYPE_CHECKING:  # imported when used: the CLI lists runs without torch
    from fedguard.core.preprocessing import FeatureScaler
    from fedguard.core.serialization import ModelWeights

__all__ = ["Checkpoint", "CheckpointStore"]

_WEIGHTS = "weights/"
_SCALER = "scaler/"

_NAME = re.compile(r"^round-(\d{4,})\.json$")


@dataclass(frozen=True)
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]

    def weights(self) -> ModelWeights:
        """The global model's weights, in the order they were saved."""
        from collections import OrderedDict

        return OrderedDict(
            (k.removeprefix(_WEIGHTS), v) for k, v in self.arrays.items() if k.startswith(_WEIGHTS)
        )

    def scaler(self) -> FeatureScaler:
        """The run's feature scaler.

        Raises:
            CheckpointError: the checkpoint holds no (or a malformed) scaler.
        """
        from fedguard.core.preprocessing import FeatureScaler

        parts = {
            k.removeprefix(_SCALER): v for k, v in self.arrays.items() if k.startswith(_SCALER)
        }
        try:
            return FeatureScaler.from_arrays(parts)
        except DataError as bad:
            raise CheckpointError(
                f"round {self.round}'s checkpoint lacks the scaler: {bad}"
            ) from None


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

    def save_model(
        self,
        round_number: int,
        weights: Mapping[str, np.ndarray],
        scaler: FeatureScaler,
        state: Any,
    ) -> Path:
        """Save a round's global model and scaler (the names :class:`Checkpoint` reads)."""
        arrays = {f"{_WEIGHTS}{k}": v for k, v in weights.items()}
        arrays.update({f"{_SCALER}{k}": v for k, v in scaler.to_arrays().items()})
        return self.save(round_number, arrays, state)

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
