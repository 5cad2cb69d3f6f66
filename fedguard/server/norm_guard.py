"""The server's norm guard: one silo's update cannot blow up the global model.

``RunConfig.update_clip_norm`` (S) is an L2 bound on each silo's update
Δ = new − global. It travels to the silos in
:attr:`~fedguard.wire.protocol.RoundInstructions.update_clip_norm` and every
honest silo clips its Δ to it. The server then checks:

* **plain mode**: each update's ‖Δ‖; one above S (up to float32 rounding, see
  :func:`check_update_norm`) is rejected with
  :class:`~fedguard.core.errors.UpdateRejectedError` and left out of the round;
* **secure aggregation**: the server never sees one Δ, so it checks the decoded
  sum: ‖Σ w_i Δ_i‖ ≤ (Σ w_i)·S, i.e. the mean within S (plus the fixed-point
  rounding). The single-group path and the groups path use S as the SecAgg clip
  norm unless ``secagg.clip_norm`` or central DP's clip norm sets another
  (:func:`secure_clip_norm`), so the ``clip-norm`` in the SecAgg setup equals it
  by default.

This is robustness, not privacy, and not Byzantine robustness either: a silo can
still send any update of norm ≤ S (robust rules and secure groups deal with
that); what the guard removes is the one finite update of 1e38 that turns a
weighted mean, and the run, into garbage.

Default S = 10 (:data:`~fedguard.core.config.UPDATE_CLIP_NORM_DEFAULT`). Measured
on the demo's defaults (``fedguard simulate``: 5 silos, Dirichlet α = 1, 10
rounds, 1 local epoch, batch 64, SGD lr 0.05 momentum 0.9, ε = 4 per silo), the
largest honest ‖Δ‖ over all silos and rounds was 3.35 on flchain with DP-SGD
(median 1.51; the DP noise dominates Δ) and 1.85 for its non-private twin;
digits 1.50 / 5.67 (non-private, round 1 only; 0.24 by round 10); credit
2.55 / 1.63; breast-cancer 0.72 / 0.17. At ε = 1 (more noise) flchain reached
6.59. S = 10 is 3× the demo's largest honest update and above every measured
one, so honest silos never clip in these settings and the demo's results are
unchanged. An honest silo above S (much more noise, more local epochs, a larger
learning rate) is clipped by itself, never rejected; raise S for such runs.
"""

from __future__ import annotations

import math

import numpy as np

from fedguard.core.config import RunConfig
from fedguard.core.errors import UpdateRejectedError

__all__ = [
    "RELATIVE_TOLERANCE",
    "check_update_norm",
    "secure_clip_norm",
    "secure_sum_violation",
]

#: Relative slack on the bound: a silo clips in float64 and sends float32 weights.
RELATIVE_TOLERANCE = 1e-5
# Each float32 weight new_i = fl(g_i + Δ_i) is off by at most eps32 · |new_i|, so the
# Δ the server recomputes can exceed the silo's clipped Δ by up to eps32 · ‖new‖.
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


def check_update_norm(delta: np.ndarray, bound: float, new_norm: float) -> float:
    """‖Δ‖, or :class:`UpdateRejectedError` if it exceeds ``bound`` (0: no bound).

    ``new_norm`` is ‖new weights‖, for the float32 rounding allowance
    ``bound · RELATIVE_TOLERANCE + eps32 · new_norm``. An attacker gains at most
    that allowance: ‖Δ‖ ≤ bound + tolerance can never be 1e38.
    """
    norm = float(np.linalg.norm(delta.astype(np.float64, copy=False)))
    if bound <= 0:
        return norm
    allowed = bound * (1.0 + RELATIVE_TOLERANCE) + _FLOAT32_EPS * new_norm
    if not (math.isfinite(norm) and norm <= allowed):
        raise UpdateRejectedError(
            f"update norm ‖Δ‖ = {norm:.4g} exceeds the update clip norm {bound:g} "
            "(an honest silo clips its update to it)"
        )
    return norm


def secure_clip_norm(config: RunConfig) -> float:
    """The L2 bound silos clip Δ to before SecAgg masking (the setup's ``clip-norm``).

    Central DP's clip norm when central DP is on (its sensitivity needs it), else
    ``secagg.clip_norm`` when set, else the run's ``update_clip_norm``.
    """
    if config.central_dp.enabled:
        return config.central_dp.clip_norm
    if config.secagg.clip_norm > 0:
        return config.secagg.clip_norm
    return config.update_clip_norm


def secure_sum_violation(
    weighted_sum: np.ndarray, total_weight: float, bound: float, rounding: float
) -> str | None:
    """Why a decoded secure sum breaks ``‖Σ w_i Δ_i‖ ≤ (Σ w_i)·bound``, or ``None``.

    Every honest silo clipped ‖Δ_i‖ ≤ bound, so the sum of ``total_weight`` weighted
    updates has norm at most ``total_weight · (bound + rounding)``, where
    ``rounding`` bounds the fixed-point rounding of one (mean) vector. The server
    cannot tell which silo broke it: the caller leaves the whole sum out.
    """
    if bound <= 0 or total_weight <= 0:
        return None
    norm = float(np.linalg.norm(weighted_sum.astype(np.float64, copy=False)))
    allowed = float(total_weight) * (bound * (1.0 + RELATIVE_TOLERANCE) + rounding)
    if math.isfinite(norm) and norm <= allowed:
        return None
    return (
        f"decoded secure sum has norm {norm:.4g} > total weight {float(total_weight):g} × "
        f"update clip norm {bound:g}: a silo in it did not clip; the sum is left out"
    )
