"""Blob: an N-D array of data and its gradient (diff), as in Caffe and pycaffe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod


class Blob:
    """Data and diff of one N-D array.

    ``data`` and ``diff`` are arrays (NumPy or CuPy) that may be written in place
    (``blob.data[...] = x``), as in pycaffe. Memory grows on ``reshape`` only when the new
    count exceeds the capacity, so a net that keeps its shapes never reallocates.
    """

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: Any = np.float32,
        backend: backend_mod.Backend | None = None,
    ) -> None:
        self.backend = backend or backend_mod.CPU
        self.dtype = np.dtype(dtype)
        self._capacity = -1
        self._shape: tuple[int, ...] = ()
        self.reshape(*shape) if len(shape) else self.reshape()

    # -- shape -------------------------------------------------------------------------------
    def reshape(self, *shape: Any) -> None:
        """Give the blob a new shape; ``blob.reshape(2, 3)`` or ``blob.reshape((2, 3))``."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"blob dimensions must be >= 0, got {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        if count > self._capacity:
            xp = self.backend.xp
            self._data_buf = xp.zeros(count, dtype=self.dtype)
            self._diff_buf = xp.zeros(count, dtype=self.dtype)
            self._capacity = count
        self._shape = shape
        self._data = self._data_buf[:count].reshape(shape)
        self._diff = self._diff_buf[:count].reshape(shape)

    def reshape_like(self, other: Blob) -> None:
        self.reshape(other.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    def _legacy(self, i: int) -> int:
        return self._shape[i] if len(self._shape) > i else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    # -- data and diff -------------------------------------------------------------------------
    @property
    def data(self) -> Any:
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data[...] = value

    @property
    def diff(self) -> Any:
        return self._diff

    @diff.setter
    def diff(self, value: Any) -> None:
        self._diff[...] = value

    def share_data(self, other: Blob) -> None:
        """Make this blob's data the very memory of ``other``'s (same count required)."""
        self._data_buf, self._data = other._data_buf, other._data
        self._shape, self._capacity = other._shape, min(self._capacity, other._capacity)

    def share_diff(self, other: Blob) -> None:
        self._diff_buf, self._diff = other._diff_buf, other._diff

    def share(self, other: Blob) -> None:
        """Share data and diff with ``other``: one parameter seen by two layers."""
        self._data_buf, self._diff_buf = other._data_buf, other._diff_buf
        self._capacity, self._shape = other._capacity, other._shape
        self._data, self._diff = other._data, other._diff

    def asum_data(self) -> float:
        return float(abs(self._data).sum())

    def asum_diff(self) -> float:
        return float(abs(self._diff).sum())

    def __repr__(self) -> str:
        return f"Blob(shape={self._shape}, dtype={self.dtype.name})"


class BlobVec(list):
    """A layer's parameter blobs; pycaffe Python layers call ``self.blobs.add_blob(*shape)``."""

    def __init__(self, dtype: Any = np.float32, backend: backend_mod.Backend | None = None):
        super().__init__()
        self._dtype = dtype
        self._backend = backend

    def add_blob(self, *shape: int) -> Blob:
        blob = Blob(shape, self._dtype, self._backend)
        self.append(blob)
        return blob
