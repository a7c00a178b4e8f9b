"""Numerically stable softmax and log-softmax over one axis, for NumPy or CuPy (``xp``).

Both subtract the per-slice maximum before exponentiating, so large scores never overflow
(Caffe's ``SoftmaxLayer`` does the same with its ``scale_`` buffer of channel maxima).
"""

from __future__ import annotations

from typing import Any


def softmax(xp: Any, x: Any, axis: int) -> Any:
    """``exp(x) / Σ_axis exp(x)``, computed stably; returns a new array of ``x``'s shape/dtype.

    Args:
        xp: ``numpy`` or ``cupy``.
        x: scores of any shape.
        axis: the axis normalised over (negative values count from the end).
    """
    e = x - x.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(xp: Any, x: Any, axis: int) -> Any:
    """``x − log Σ_axis exp(x)``, computed stably (log-sum-exp); returns a new array.

    Args:
        xp: ``numpy`` or ``cupy``.
        x: scores of any shape.
        axis: the axis normalised over (negative values count from the end).
    """
    shifted = x - x.max(axis=axis, keepdims=True)
    # NOTE: the shifted maximum is 0, so the sum is >= 1 and its log never hits -inf.
    lse = xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    shifted -= lse
    return shifted
