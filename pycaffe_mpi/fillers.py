"""Weight fillers (Caffe's ``FillerParameter``): constant, uniform, gaussian, positive_unitball,
xavier, msra, bilinear.

fan_in = count / shape[0], fan_out = count / shape[1] (count for 1-D blobs);
n = fan_in, fan_out or their mean, per ``variance_norm``.

Parameters out of range are a :class:`~pycaffe_mpi.errors.NetError` naming the layer (when
known) and the field, where Caffe would abort in a ``CHECK`` or silently fill NaN:

* every number used (value, min, max, mean, std) must be finite;
* uniform: min <= max (Caffe's ``caffe_rng_uniform`` check);
* gaussian: std >= 0 (Caffe requires std > 0; std 0 here fills the constant mean);
  sparse: only the gaussian filler takes it (-1 = off), and the keep probability
  sparse / shape[0] must lie in [0, 1];
* xavier / msra: the blob must have at least one axis and at least one element (a fan);
* an unknown type is an error with a did-you-mean.

:func:`check_layer_fillers` checks every filler of a ``LayerParameter`` before any blob is
made (shape-free checks); :func:`fill` checks the rest against the blob's shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors

FAN_IN, FAN_OUT, AVERAGE = 0, 1, 2
FILLERS = ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear")
_NUMBERS = {"constant": ("value",), "uniform": ("min", "max"), "gaussian": ("mean", "std")}


def _fan_n(shape: Sequence[int], variance_norm: int) -> float:
    count = int(np.prod(shape))
    fan_in = count / shape[0] if len(shape) else 1.0
    fan_out = count / shape[1] if len(shape) > 1 else float(count)
    if variance_norm == AVERAGE:
        return (fan_in + fan_out) / 2.0
    if variance_norm == FAN_OUT:
        return fan_out
    return fan_in


def _raiser(layer: Any, field: str, location: str = "") -> Any:
    """A ``fail(subfield, msg)`` that raises a NetError naming the layer (if any) and field."""
    param = getattr(layer, "layer_param", layer)
    location = location or getattr(layer, "location", "")

    def fail(sub: str, msg: str) -> None:
        name = f"{field}.{sub}" if field and sub else field or sub or "filler"
        if param is None:
            raise errors.NetError(f"filler field {name}: {msg}")
        errors.require(False, param, name, msg, location=location)
    return fail


def check_filler(filler: Any, layer: Any = None, field: str = "", location: str = "") -> None:
    """Check what can be checked of ``filler`` without a blob shape.

    Args:
        filler: a ``FillerParameter`` (None = constant 0, always fine).
        layer: the ``Layer`` or ``LayerParameter`` it belongs to, named in the error.
        field: its path in the layer, e.g. ``"convolution_param.weight_filler"``.
        location: the layer's ``file:line`` (default: ``layer.location`` when it has one).

    Raises:
        errors.NetError: an unknown type, a non-finite number, min > max, std < 0, or
            sparse on a filler other than gaussian.
    """
    if filler is None:
        return
    fail = _raiser(layer, field, location)
    kind = filler.type
    if kind not in FILLERS:
        fail("type", f'unknown filler type "{kind}"{errors.did_you_mean(kind, FILLERS)} '
             f"(known: {', '.join(FILLERS)})")
    for name in _NUMBERS.get(kind, ()):
        value = getattr(filler, name)
        if not math.isfinite(value):
            fail(name, f"the {kind} filler's {name} must be a finite number, got {value}")
    if kind == "uniform" and filler.min > filler.max:
        fail("min", f"the uniform filler needs min <= max, got min {filler.min} > max "
             f"{filler.max}")
    if kind == "gaussian" and filler.std < 0:
        fail("std", f"the gaussian filler's std must be >= 0, got {filler.std}")
    if kind != "gaussian" and filler.sparse >= 0:
        fail("sparse", f"sparsity is supported by the gaussian filler only, not {kind!r}; "
             "remove sparse")


def _fillers_in(message: Any, prefix: str, depth: int) -> Iterator[tuple[str, Any]]:
    for fd, value in message.ListFields():
        if fd.message_type is None or fd.message_type.name == "BlobProto" or depth > 3:
            continue
        path = f"{prefix}{fd.name}"
        items = list(enumerate(value)) if _is_repeated(fd) else [(None, value)]
        for i, item in items:
            where = path if i is None else f"{path}[{i}]"
            if fd.message_type.name == "FillerParameter":
                yield where, item
            else:
                yield from _fillers_in(item, f"{where}.", depth + 1)


def _is_repeated(fd: Any) -> bool:
    # NOTE: FieldDescriptor.label is deprecated in newer protobuf; is_repeated replaces it.
    rep = getattr(fd, "is_repeated", None)
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def check_layer_fillers(layer_param: Any, location: str = "") -> None:
    """Check every ``FillerParameter`` set anywhere in ``layer_param`` (see :func:`check_filler`).

    Errors name the layer, its ``file:line`` when ``location`` is given, and the full field
    path (``convolution_param.weight_filler.std``).
    """
    for path, filler in _fillers_in(layer_param, "", 0):
        check_filler(filler, layer_param, path, location)


def fill(filler: Any, shape: Sequence[int], rng: np.random.Generator,
         dtype: Any = np.float32, layer: Any = None, field: str = "") -> np.ndarray:
    """Draw a host array of ``shape`` as ``filler`` (a ``FillerParameter``) says.

    No filler set means Caffe's default: ``constant`` with value 0. ``layer`` (a ``Layer`` or
    ``LayerParameter``) and ``field`` only name the culprit in errors.

    Raises:
        errors.NetError: parameters out of range (see the module docstring).
    """
    shape = tuple(int(d) for d in shape)
    if filler is None:
        return np.zeros(shape, dtype=dtype)
    check_filler(filler, layer, field)
    fail = _raiser(layer, field)
    kind = filler.type
    if kind in ("xavier", "msra", "positive_unitball") and \
            (not shape or int(np.prod(shape)) == 0):
        fail("type", f"the {kind} filler needs a blob with at least one axis and one element "
             f"(its fan), got shape {shape}")
    if kind == "constant":
        out = np.full(shape, filler.value)
    elif kind == "uniform":
        out = rng.uniform(filler.min, filler.max, shape)
    elif kind == "gaussian":
        out = rng.normal(filler.mean, filler.std, shape)
        if filler.sparse >= 0:
            out = out * _sparse_mask(filler.sparse, shape, rng, fail)
    elif kind == "positive_unitball":
        out = rng.uniform(0.0, 1.0, shape)
        rows = out.reshape(shape[0], -1)
        rows /= rows.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        scale = np.sqrt(3.0 / _fan_n(shape, filler.variance_norm))
        out = rng.uniform(-scale, scale, shape)
    elif kind == "msra":
        out = rng.normal(0.0, np.sqrt(2.0 / _fan_n(shape, filler.variance_norm)), shape)
    else:  # bilinear (check_filler refused unknown types)
        if len(shape) != 4 or shape[2] != shape[3]:
            fail("type", f"the bilinear filler needs a 4-D blob with square kernels, got {shape}")
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        x = np.arange(k)
        w1 = 1 - np.abs(x / f - c)
        out = np.broadcast_to(np.outer(w1, w1), shape)
    return np.ascontiguousarray(out, dtype=dtype)


def _sparse_mask(sparse: int, shape: tuple[int, ...], rng: np.random.Generator,
                 fail: Any) -> np.ndarray:
    """Caffe's sparse gaussian: keep each weight with probability sparse / shape[0]."""
    if not shape:
        fail("sparse", "a sparse gaussian filler needs a blob of at least 1 axis, got a scalar")
    if sparse > shape[0]:
        fail("sparse", f"keep probability sparse / num_outputs = {sparse} / {shape[0]} is "
             "outside [0, 1]; give sparse <= the blob's first dimension")
    return rng.random(shape) < sparse / shape[0]
