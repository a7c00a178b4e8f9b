"""Scratch memory for kernels: per-layer buffers and the process-wide, per-lane workspace."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from pycaffe_mpi import blob as blob_mod


def _aligned_empty(xp: Any, shape: tuple[int, ...], dtype: np.dtype, align: int) -> Any:
    # NOTE: Caffe's scratch memory is Blobs, so its INT_MAX check and our allocation error
    # (naming shape and bytes; the Net adds the layer) apply to these buffers too
    size = blob_mod._checked_count(shape, "work buffer") * dtype.itemsize
    try:
        if xp is not np:
            return xp.empty(shape, dtype)
        raw = np.empty(size + align, np.uint8)
    except MemoryError as e:
        raise blob_mod.BlobAllocationError(
            f"cannot allocate a work buffer of shape {shape} ({dtype.name}, {size} bytes, "
            f"{size / 2**30:.3g} GiB): {e}") from e
    start = -raw.ctypes.data % align
    return raw[start:start + size].view(dtype).reshape(shape)


class Buffers:
    """Scratch arrays kept between calls, reallocated only when their shape changes."""

    # NOTE: host buffers start on a cache line (NumPy's large arrays start 16 bytes past a page):
    # the im2col copy between two such buffers measured ~20% faster.
    ALIGN = 64

    def __init__(self, xp: Any, dtype: Any) -> None:
        self.xp, self.dtype, self._arrays = xp, dtype, {}

    def get(self, name: str, shape: Sequence[int], fill: float | None = None,
            dtype: Any = None) -> Any:
        """The buffer ``name`` of ``shape``; a new one is filled with ``fill`` (or left empty)."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype or self.dtype)
        arr = self._arrays.get(name)
        if arr is None or arr.shape != shape or arr.dtype != dtype:
            arr = _aligned_empty(self.xp, shape, dtype, self.ALIGN)
            if fill is not None:
                arr[...] = fill
            self._arrays[name] = arr
        return arr


class Workspace:
    """Scratch shared by every :class:`ConvPlan` of the process, one set per lane
    (:mod:`~pycaffe_mpi.kernels.threads`): the layers run one at a time and no plan keeps data
    in it between calls, so each named buffer is as large as the largest request for it, not
    one per layer.

    NOTE: ResNet-50 (53 convolutions) at batch 8 held ~1 GB of per-layer im2col scratch before,
    and ~200 MiB of per-layer, per-lane weight-gradient partial sums.

    A buffer that grows bumps :attr:`generation`; plans drop their views of older buffers then.
    """

    generation = 0
    _flat: ClassVar[dict[tuple[str, int, str], Any]] = {}
    _owner: ClassVar[dict[tuple[str, int, str], Any]] = {}

    @classmethod
    def get(cls, xp: Any, lane: int, name: str, shape: Sequence[int], dtype: np.dtype) -> Any:
        """A ``shape`` view of ``name``'s buffer on ``lane`` (contents undefined)."""
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        key = (getattr(xp, "__name__", "numpy"), lane, name)
        flat = cls._flat.get(key)
        if flat is None or flat.nbytes < nbytes:
            flat = _aligned_empty(xp, (max(nbytes, 1),), np.dtype(np.uint8), Buffers.ALIGN)
            cls._flat[key] = flat
            cls.generation += 1
        return flat[:nbytes].view(dtype).reshape(shape)

    @classmethod
    def claim(cls, xp: Any, lane: int, name: str, shape: Sequence[int], dtype: np.dtype,
              owner: Any) -> tuple[Any, bool]:
        """:meth:`get`, and whether someone other than ``owner`` (any hashable token) wrote the
        buffer since ``owner`` last claimed it: then the caller must set what it relies on
        (e.g. a zero border) again."""
        arr = cls.get(xp, lane, name, shape, dtype)
        key = (getattr(xp, "__name__", "numpy"), lane, name)
        stamp = (owner, cls.generation, arr.shape, arr.dtype)  # a new layout moves the border
        mine = cls._owner.get(key) == stamp
        cls._owner[key] = stamp
        return arr, not mine

    @classmethod
    def clear(cls) -> None:
        """Free every buffer (the next calls allocate what they need)."""
        cls._flat, cls._owner = {}, {}
        cls.generation += 1
