"""Blob: an N-D array of data and its gradient (diff), as in Caffe and pycaffe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors

INT_MAX = 2**31 - 1  # Caffe counts elements in an int: a blob holds at most this many


class BlobAllocationError(errors.NetError, MemoryError):
    """The memory for a blob could not be allocated; names its shape and bytes.

    Also a ``MemoryError``, so code that catches that still catches this.
    """


class Blob:
    """Data and diff of one N-D array.

    ``data`` and ``diff`` are arrays (NumPy or CuPy) that may be written in place
    (``blob.data[...] = x``), as in pycaffe. Memory grows on ``reshape`` only when the new
    count exceeds the capacity, so a net that keeps its shapes never reallocates.

    ``name`` (optional) only names the blob in errors. A count over ``INT_MAX`` is a
    :class:`~pycaffe_mpi.errors.ShapeError` ("blob size exceeds INT_MAX", Caffe's check), and
    memory that cannot be had a :class:`BlobAllocationError` giving the shape and bytes.
    """

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: Any = np.float32,
        backend: backend_mod.Backend | None = None,
        name: str = "",
    ) -> None:
        self.backend = backend or backend_mod.CPU
        self.name = name
        self.dtype = np.dtype(dtype)
        self._capacity = -1
        self._shape: tuple[int, ...] = ()
        self._slot: DiffSlot | None = None  # a gradient buffer shared with other blobs
        self._slot_generation = -1
        self.reshape(*shape) if len(shape) else self.reshape()

    # -- shape -------------------------------------------------------------------------------
    def reshape(self, *shape: Any) -> None:
        """Give the blob a new shape; ``blob.reshape(2, 3)`` or ``blob.reshape((2, 3))``."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"blob dimensions must be >= 0, got {shape}")
        count = _checked_count(shape, self._what())
        if count > self._capacity:
            self._allocate(count, shape)
        self._shape = shape
        self._data = self._data_buf[:count].reshape(shape)
        if self._slot is not None:
            self._diff = self._slot.view(count, shape)
            self._slot_generation = self._slot.generation
        else:
            self._diff = self._diff_buf[:count].reshape(shape)

    def _what(self) -> str:
        return f'blob "{self.name}"' if self.name else "blob"

    def _allocate(self, count: int, shape: tuple[int, ...]) -> None:
        xp = self.backend.xp
        try:
            data = xp.zeros(count, dtype=self.dtype)
            diff = None if self._slot is not None else xp.zeros(count, dtype=self.dtype)
        except MemoryError as e:  # numpy's _ArrayMemoryError and CuPy's OutOfMemoryError too
            nbytes = count * self.dtype.itemsize
            raise BlobAllocationError(
                f"cannot allocate {self._what()} of shape {shape} ({self.dtype.name}): data and "
                f"diff need 2 x {nbytes} bytes ({2 * nbytes / 2**30:.3g} GiB) on the "
                f"{self.backend.kind.upper()}: {e}") from e
        # NOTE: assigned only when both succeed, so a failed reshape leaves the blob as it was.
        self._data_buf, self._diff_buf, self._capacity = data, diff, count

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
        slot = self._slot
        if slot is not None and self._slot_generation != slot.generation:  # the slot grew
            self._diff = slot.view(self.count, self._shape)
            self._slot_generation = slot.generation
        return self._diff

    @diff.setter
    def diff(self, value: Any) -> None:
        self.diff[...] = value

    def share_data(self, other: Blob) -> None:
        """Make this blob's data the very memory of ``other``'s, taking its shape (the diff
        stays this blob's own, viewed in the new shape)."""
        self._data_buf, self._data = other._data_buf, other._data
        self._shape = other._shape
        count = self.count
        if self._slot is not None:
            self._diff = self._slot.view(count, self._shape)
            self._slot_generation = self._slot.generation
            diff_capacity = count
        else:
            if self._diff_buf is None or self._diff_buf.size < count:
                self._diff_buf = self.backend.xp.zeros(count, dtype=self.dtype)
            self._diff = self._diff_buf[:count].reshape(self._shape)
            diff_capacity = int(self._diff_buf.size)
        self._capacity = min(other._capacity, diff_capacity)

    def share_diff(self, other: Blob) -> None:
        self._diff_buf, self._diff = other._diff_buf, other._diff

    def share(self, other: Blob) -> None:
        """Share data and diff with ``other``: one parameter seen by two layers."""
        self._data_buf, self._diff_buf = other._data_buf, other._diff_buf
        self._capacity, self._shape = other._capacity, other._shape
        self._data, self._diff = other._data, other._diff

    def use_diff_slot(self, slot: DiffSlot) -> None:
        """Keep this blob's diff in ``slot``, a buffer shared with blobs whose gradients are
        never alive at the same time (:mod:`pycaffe_mpi.diff_sharing`); its own diff memory is
        released. The diff's contents are undefined until a backward pass writes them."""
        self._slot, self._diff_buf = slot, None
        self._diff = slot.view(self.count, self._shape)
        self._slot_generation = slot.generation

    def asum_data(self) -> float:
        return float(abs(self._data).sum())

    def asum_diff(self) -> float:
        return float(abs(self.diff).sum())


class DiffSlot:
    """One gradient buffer for several blobs (``Blob.use_diff_slot``), grown to the largest.

    ``generation`` counts the times it grew: a blob holding a view of the older buffer takes a
    new view on its next ``diff`` access.
    """

    def __init__(self, backend: backend_mod.Backend, dtype: Any) -> None:
        self.backend, self.dtype = backend, np.dtype(dtype)
        self.buf: Any = None
        self.generation = 0

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else int(self.buf.size)

    def view(self, count: int, shape: tuple[int, ...]) -> Any:
        """The first ``count`` elements as ``shape``."""
        if count > self.capacity:
            try:
                self.buf = self.backend.xp.zeros(count, dtype=self.dtype)
            except MemoryError as e:
                raise BlobAllocationError(
                    f"cannot allocate a shared diff buffer of {count} elements "
                    f"({self.dtype.name}, {count * self.dtype.itemsize} bytes): {e}") from e
            self.generation += 1
        return self.buf[:count].reshape(shape)

    def __repr__(self) -> str:
        return f"Blob(shape={self._shape}, dtype={self.dtype.name})"


def _checked_count(shape: tuple[int, ...], what: str = "blob") -> int:
    """The element count of ``shape``, refused past INT_MAX as Caffe's ``Blob::Reshape`` does."""
    count = 1
    for d in shape:
        # NOTE: Caffe multiplies dimension by dimension and stops checking at a zero count.
        if count and d > INT_MAX // count:
            raise errors.ShapeError(
                f"blob size exceeds INT_MAX: {what} of shape {shape}: the product of its "
                f"dimensions reaches {count * d}, more than {INT_MAX} (2**31 - 1, Caffe's "
                "limit); check the parameters that set this shape")
        count *= d
    return count


def name_layer(exc: BaseException, layer: Any) -> BaseException:
    """``exc`` (one of ours, or a MemoryError) as the same error type with its message prefixed
    by ``file:line: layer "name" (type T)``; where it names the layer already, by ``file:line``
    alone (unless it has that too).

    For the Net to wrap a layer's setup and reshape, so errors raised by blobs (which do not know
    their layer) name it: ``raise blob.name_layer(e, layer) from e``.
    """
    param = getattr(layer, "layer_param", layer)
    location = getattr(layer, "location", "")
    msg = str(exc)
    if f'layer "{param.name}"' in msg:
        if location and location not in msg:
            msg = f"{location}: {msg}"  # layers name themselves but do not know their line
        elif isinstance(exc, errors.PycaffeError):
            return exc
    else:
        msg = f"{errors.layer_where(param, location)}: {msg}"
    if isinstance(exc, errors.PycaffeError):
        try:
            return type(exc)(msg)
        except TypeError:  # an exception class with another signature: keep it as it is
            return exc
    if isinstance(exc, MemoryError):
        return BlobAllocationError(msg if str(exc) else f"{msg}out of memory")
    return exc


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
