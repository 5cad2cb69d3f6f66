"""Canonical JSON: the one encoding that content hashes are taken over.

UTF-8, keys sorted, no white space, no NaN or infinity
(``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)``). The signed, hash-chained logs hash their records in it;
the weights' content hash (:mod:`fedguard.core.serialization`) encodes each
tensor's header in it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(value: Any) -> bytes:
    """The canonical encoding that hashes are taken over (input must be plain JSON types)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
