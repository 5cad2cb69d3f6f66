"""Typed error hierarchy.

Every error fedguard raises on bad input derives from :class:`FedguardError`, so a
caller can catch one type, and the CLI can print a one-line message instead of a
traceback. Sub-types say *what* was wrong; the message says *why* and what to do.
"""

from __future__ import annotations


class FedguardError(Exception):
    """Base class of every error fedguard raises on purpose."""


class ConfigError(FedguardError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class DataError(FedguardError):
    """Data could not be loaded or does not fit the expected schema."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A silo's data file does not exist."""


class UnknownDatasetError(DataError, ConfigError):
    """A data set name that fedguard does not know."""


class MissingExtraError(DataError, ImportError):
    """A data set needs an optional package extra that is not installed."""


class PartitionError(DataError):
    """A partition cannot be made as asked (for example it would leave a silo empty)."""


class TrainingRefusedError(FedguardError):
    """A silo's policy forbids what the server asked (it replies ``refused``)."""


class PrivacyError(FedguardError):
    """Base class of privacy-accounting errors."""


class BudgetExhaustedError(PrivacyError):
    """Training would take a silo past its privacy budget; nothing was charged."""


class InfeasibleBudgetError(PrivacyError, ConfigError):
    """The privacy budget cannot pay for even one round of training."""


class UnsupportedEventError(PrivacyError):
    """An accountant cannot compose a privacy event (the sub-event is named)."""


class LedgerError(PrivacyError):
    """The privacy ledger on disk is missing, corrupt or inconsistent with the config."""


class UpdateRejectedError(FedguardError):
    """A client's model update is unusable; ``reason`` is written to the round log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NonFiniteUpdateError(UpdateRejectedError):
    """A client's update holds NaN or Inf."""


class ShapeMismatchError(UpdateRejectedError):
    """A client's update has missing, extra or wrongly shaped or typed tensors."""


class ProtocolError(FedguardError):
    """A message does not follow fedguard's message protocol."""


class RunFolderError(FedguardError):
    """A saved run folder is missing, incomplete, or does not match its own config."""


class CheckpointError(FedguardError):
    """A checkpoint cannot be written or read."""


class StorageError(FedguardError, OSError):
    """A file fedguard keeps its state in cannot be read or written.

    Full disk, read-only file or folder, a damaged SQLite page, an I/O error: the
    message names the file and the cause (the errno name, such as ``ENOSPC``, or
    SQLite's error, such as ``SQLITE_CORRUPT: database disk image is malformed``);
    ``path`` and ``cause`` hold them. It is also an :class:`OSError`, so code that
    catches file errors keeps catching it. Each store raises its own sub-type,
    which is also that store's error type (:class:`LedgerStorageError` is a
    :class:`LedgerError`, and so on).
    """

    def __init__(
        self,
        message: str,
        *,
        path: object = None,
        cause: str | None = None,
        os_errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.cause = cause
        self.errno = os_errno

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LedgerStorageError(LedgerError, StorageError):
    """The privacy ledger's file cannot be read or written (nothing was charged or changed)."""


class OutboxStorageError(LedgerStorageError):
    """An entry of the silo's outbox (what it sent, kept for replays) cannot be written."""


class CheckpointStorageError(CheckpointError, StorageError):
    """A round checkpoint cannot be written or read from disk."""
