"""Deterministic seed derivation.

One root seed drives a whole run. Every consumer (the partitioner, each silo's
train/test split, model initialisation, ...) derives its own seed from the root and
a few labels, so adding or reordering consumers never shifts another consumer's
random stream: ``derive_seed(seed, "partition")``, ``derive_seed(seed, "silo", 3, "split")``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedguard.core.errors import ConfigError

_SEED_BOUND = 2**63


def _encode_part(part: object) -> bytes:
    # A type tag and a length prefix make the encoding injective: ("a", "bc") differs
    # from ("ab", "c"), and the label 3 differs from the label "3".
    if isinstance(part, bool) or not isinstance(part, (int, str)):
        raise ConfigError(
            f"seed labels must be str or int (not bool), got {part!r} of type {type(part).__name__}"
        )
    tag = b"i" if isinstance(part, int) else b"s"
    body = str(part).encode("utf-8")
    return tag + len(body).to_bytes(8, "big") + body


def derive_seed(root: int, *labels: str | int) -> int:
    """A seed in ``[0, 2**63)`` from SHA-256 over ``root`` and ``labels``.

    Different labels give independent streams; the same arguments always give the
    same seed, on every platform.
    """
    if isinstance(root, bool) or not isinstance(root, int):
        raise ConfigError(f"root seed must be an int, got {root!r} of type {type(root).__name__}")
    digest = hashlib.sha256()
    digest.update(b"fedguard-seed-v1")
    digest.update(_encode_part(root))
    for label in labels:
        digest.update(_encode_part(label))
    return int.from_bytes(digest.digest()[:8], "big") % _SEED_BOUND


def numpy_rng(root: int, *labels: str | int) -> np.random.Generator:
    """A numpy Generator seeded with ``derive_seed(root, *labels)``."""
    return np.random.default_rng(derive_seed(root, *labels))


def seed_torch(seed: int) -> None:
    """Seed torch's global generator (enough for deterministic CPU training)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"torch seed must be an int in [0, 2^64), got {seed!r}")
    # Imported here so that data-only code paths do not pay torch's import time.
    import torch

    torch.manual_seed(seed)
