"""Numerically stable softmax and log-softmax over one axis, for NumPy or CuPy (``xp``).

Both subtract the per-slice maximum before exponentiating, so large scores never overflow
(Caffe's ``SoftmaxLayer`` does the same with its ``scale_`` buffer of channel maxima).
"""

from __future__ import annotations

from typing import Any

from pycaffe_mpi.kernels import cuda as cuda_k


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


# -- the softmax loss on a GPU: one kernel each way (kernels/cuda.py) ------------------------------


def loss_forward(xp: Any, x3: Any, label: Any, ignore_label: int | None, log_min: float,
                 normalizer: float | None, out: Any) -> tuple[Any, Any, Any] | None:
    """SoftmaxWithLoss forward in one CUDA kernel, or None (nothing done) off CuPy.

    ``x3``: scores ``(outer, C, inner)``; ``label``: ``outer·inner`` class indices (floats,
    truncated); ``out`` (0-d) = ``Σ −max(log p_y, log_min) / normalizer`` over non-ignored
    positions, ``normalizer`` None meaning the count of those (at least 1), kept on the device so
    nothing waits for the host. A label outside ``[0, C)`` makes the loss NaN (the check needs no
    host round-trip). Returns ``(prob (outer, C, inner), valid (outer·inner,) of 0/1,
    normalizer as a device scalar)`` for :func:`loss_backward`.
    """
    if not cuda_k.enabled(xp):
        return None
    dt = x3.dtype
    x3 = xp.ascontiguousarray(x3)
    label = xp.ascontiguousarray(label.reshape(-1), dtype=dt)
    prob = xp.empty(x3.shape, dt)
    loss = xp.empty(label.shape, dt)
    valid = xp.empty(label.shape, dt)
    cuda_k.softmax_loss_forward(x3, label, prob, loss, valid, ignore_label, log_min)
    norm = (xp.maximum(valid.sum(), 1) if normalizer is None
            else xp.asarray(normalizer)).astype(dt)
    out[...] = loss.sum() / norm
    return prob, valid, norm


def loss_backward(xp: Any, prob: Any, label: Any, valid: Any, top_diff: Any, norm: Any,
                  dx: Any) -> bool:
    """``dx = (prob − onehot) · valid · top_diff / norm`` in one CUDA kernel (after
    :func:`loss_forward`); False (nothing done) off CuPy."""
    if not cuda_k.enabled(xp):
        return False
    dt = prob.dtype
    scale = (xp.asarray(top_diff, dtype=dt) / norm).reshape(1)
    label = xp.ascontiguousarray(label.reshape(-1), dtype=dt)
    if dx.flags.c_contiguous:
        cuda_k.softmax_loss_backward(prob, label, valid, scale, dx.reshape(prob.shape))
    else:
        tmp = xp.empty(prob.shape, dt)
        cuda_k.softmax_loss_backward(prob, label, valid, scale, tmp)
        dx[...] = tmp.reshape(dx.shape)
    return True
