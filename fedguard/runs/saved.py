"""A finished run variant as its readers see it (export, explain).

The run's config is read from its last checkpoint, in the flat option form the
orchestrator wrote (``RunConfig.to_options``) and parsed back with the one parser
``RunConfig.from_options``: a saved run has one serial form of its config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedguard.core.config import RunConfig
from fedguard.core.errors import CheckpointError, FedguardError, RunFolderError
from fedguard.runs.checkpoints import Checkpoint, CheckpointStore
from fedguard.runs.layout import VARIANTS, RunFolder, VariantFolder

if TYPE_CHECKING:
    from fedguard.core.preprocessing import FeatureScaler
    from fedguard.core.serialization import ModelWeights

__all__ = ["SavedRun", "load_saved_run"]


@dataclass(frozen=True)
class SavedRun:
    run_dir: Path
    variant: str
    variant_dir: Path
    config: RunConfig  # the variant's own config (no-dp has local DP off)
    run_id: str  # the run id the silos' ledgers know the variant's rounds by
    checkpoint: Checkpoint
    history: list[dict[str, Any]]

    @property
    def teacher_weights(self) -> ModelWeights:
        return self.checkpoint.weights()

    @property
    def scaler(self) -> FeatureScaler:
        try:
            return self.checkpoint.scaler()
        except CheckpointError as bad:
            raise RunFolderError(str(bad)) from None

    def silo_dir(self, silo_id: str) -> Path:
        return VariantFolder(self.variant_dir).silo(silo_id)


def load_saved_run(run_dir: Path, variant: str | None = None) -> SavedRun:
    """The config, last checkpoint and history of one variant of a finished run.

    Raises:
        RunFolderError: the folder is not a finished run, lacks the variant, or its
            checkpoint or config cannot be read.
    """
    run = RunFolder(Path(run_dir))
    if not run.report.is_file():
        raise RunFolderError(
            f"{run.root} is not a fedguard run folder: {run.report.name} is missing "
            "(run fedguard simulate first, and let it finish)"
        )
    present = run.variants_present()
    if variant is None:
        if not present:
            raise RunFolderError(f"{run.root} holds no variant with checkpoints ({VARIANTS})")
        variant = present[0]
    elif variant not in present:
        raise RunFolderError(f"{run.root} has no {variant!r} variant; it has {present}")
    folder = run.variant(variant)
    try:
        checkpoint = CheckpointStore(folder.checkpoints).latest()
    except CheckpointError as bad:
        raise RunFolderError(str(bad)) from None
    if checkpoint is None:
        raise RunFolderError(f"{folder.checkpoints} holds no checkpoint")
    options = checkpoint.state.get("config")
    if not isinstance(options, dict):
        raise RunFolderError(f"{folder.checkpoints}: round {checkpoint.round} has no run config")
    try:
        config = RunConfig.from_options(options)
    except FedguardError as bad:
        raise RunFolderError(f"the run's config is invalid: {bad}") from None
    try:
        history: list[dict[str, Any]] = (
            json.loads(folder.history.read_text()) if folder.history.is_file() else []
        )
    except ValueError as bad:
        raise RunFolderError(f"{folder.history} is not JSON: {bad}") from None
    # The simulator's run id of a variant: "<run folder name>/<variant>".
    run_id = str(checkpoint.state.get("run_id", f"{run.root.name}/{variant}"))
    return SavedRun(run.root, variant, folder.root, config, run_id, checkpoint, history)
