"""HDF5 layers: HDF5Data (rows of HDF5 datasets as tops) and HDF5Output (bottoms to a file).

Neither has a gradient: HDF5Data is a data layer, HDF5Output a sink whose backward passes
nothing (as Caffe's).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TRAIN, Layer
from pycaffe_mpi.registry import register_layer

log = logging.getLogger(__name__)


def _h5py() -> Any:
    import h5py  # a dependency, imported late so `import pycaffe_mpi` stays light

    return h5py


# == HDF5Data ==================================================================================
@register_layer("HDF5Data")
class HDF5Data(Layer):
    """Rows of HDF5 datasets, one dataset per top, named like the top.

    Params (``hdf5_data_param``): source (a text file listing .h5 files, whitespace
    separated; a relative name is looked up as given, then next to the list file),
    batch_size, shuffle (false). ``transform_param`` is refused (Caffe: HDF5 data is not
    transformed).

    Shapes:
        top[i]: (batch_size, *D_i) where dataset ``top[i]`` has shape (rows, *D_i) in every
            file; all datasets of one file have the same number of rows.

    Forward: the next batch_size rows, in file order (Caffe's ``Next``): at the end of a file
    the next file is loaded; after the last file the first follows again. With shuffle the
    file order is shuffled at setup and at every wrap, and the rows of a file are shuffled
    each time it is (re)entered, all from ``self.rng``. Values are cast to the layer's dtype.
    Each file is read whole into memory, as Caffe does. ``get_state`` holds the position and
    permutations, so a resumed run reads exactly the rows an uninterrupted one would.
    Data-parallel replica k of n (``set_replica``) takes row i of the stream only when
    i mod n == k (Caffe's ``HDF5DataLayer::Skip``); with shuffle each replica shuffles with
    its own generator, so their rows are not disjoint then.

    Backward: none (a data layer: as in Caffe, nothing is passed down).
    """

    is_data = True
    exact_num_bottom = 0
    min_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.hdf5_data_param
        self.require(not self.layer_param.HasField("transform_param"), "transform_param",
                     "HDF5Data does not transform data; preprocess the HDF5 files instead")
        self.batch_size = int(p.batch_size)
        self.require(self.batch_size > 0, "hdf5_data_param.batch_size",
                     f"expected a positive batch size, got {self.batch_size}")
        self.shuffle = bool(p.shuffle)
        self.source = p.source
        self.names = list(self.layer_param.top)
        self.filenames = self._read_source()
        self.file_perm = np.arange(len(self.filenames))
        if self.shuffle:
            self.rng.shuffle(self.file_perm)
        self.current_file, self.current_row = 0, 0
        self._offset = 0  # rows passed over in the whole stream (data-parallel replicas)
        self._load(self.filenames[self.file_perm[0]])
        self.shapes = [(self.batch_size, *a.shape[1:]) for a in self.arrays]
        self.reshape(bottom, top)

    def _read_source(self) -> list[str]:
        self.require(bool(self.source), "hdf5_data_param.source", "no list file given")
        try:
            with open(self.source) as f:
                names = f.read().split()
        except OSError as e:
            raise errors.DataError(f"{self._where()}, field hdf5_data_param.source: cannot "
                                   f"read the list file {self.source!r}: {e}") from None
        errors.require(names, self.layer_param, "hdf5_data_param.source",
                       f"must have at least 1 HDF5 filename listed in {self.source!r}",
                       exc=errors.DataError, location=self.location)
        here = os.path.dirname(os.path.abspath(self.source))
        return [n if os.path.exists(n) or os.path.isabs(n) else os.path.join(here, n)
                for n in names]

    def _where(self) -> str:
        return errors.layer_where(self.layer_param, self.location)

    def _load(self, filename: str) -> None:
        """Read every top's dataset of ``filename``; new row order (shuffled if asked)."""
        try:
            f = _h5py().File(filename, "r")
        except OSError as e:
            raise errors.DataError(f"{self._where()}: failed opening HDF5 file {filename!r} "
                                   f"(listed in {self.source!r}): {e}") from None
        with f:
            arrays = []
            for name in self.names:
                if name not in f or not isinstance(f[name], _h5py().Dataset):
                    raise errors.DataError(
                        f"{self._where()}: HDF5 file {filename!r} has no dataset {name!r} "
                        f"(each top names a dataset; the file has {sorted(f.keys())})")
                ds = f[name]
                if ds.ndim < 1 or ds.dtype.kind not in "fiub":
                    raise errors.DataError(
                        f"{self._where()}: dataset {name!r} in {filename!r} has shape "
                        f"{ds.shape} and type {ds.dtype}; expected numbers with at least 1 axis")
                arrays.append(np.asarray(ds[()], dtype=self.dtype))
        rows = arrays[0].shape[0]
        for name, a in zip(self.names, arrays):
            if a.shape[0] != rows:
                raise errors.DataError(
                    f"{self._where()}: in HDF5 file {filename!r} dataset {name!r} has "
                    f"{a.shape[0]} rows but dataset {self.names[0]!r} has {rows}; every "
                    "dataset of a file needs the same first dimension")
        if hasattr(self, "shapes"):
            for name, a, shape in zip(self.names, arrays, self.shapes):
                if a.shape[1:] != shape[1:]:
                    raise errors.DataError(
                        f"{self._where()}: dataset {name!r} in {filename!r} has rows of shape "
                        f"{a.shape[1:]}, but the first file's have {shape[1:]}")
        if rows == 0:
            raise errors.DataError(f"{self._where()}: HDF5 file {filename!r} has 0 rows")
        self.arrays = arrays
        self.row_perm = np.arange(rows)
        if self.shuffle:
            self.rng.shuffle(self.row_perm)

    def _next_file(self) -> None:
        """Caffe's ``Next`` at the end of a file."""
        if len(self.filenames) > 1:
            self.current_file += 1
            if self.current_file == len(self.filenames):
                self.current_file = 0
                if self.shuffle:
                    self.rng.shuffle(self.file_perm)
            self._load(self.filenames[self.file_perm[self.current_file]])
        self.current_row = 0
        if self.shuffle:
            self.rng.shuffle(self.row_perm)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t, shape in zip(top, self.shapes):
            t.reshape(shape)

    def set_replica(self, index: int, count: int) -> None:
        """Read only data-parallel replica ``index`` of ``count``'s rows (TRAIN nets)."""
        if self.phase == TRAIN:
            self._replica = (int(index), int(count))

    def _forward_replica(self, top: Sequence[Blob], k: int, n: int) -> None:
        done = 0
        while done < self.batch_size:
            left = len(self.row_perm) - self.current_row
            # the rows of this file segment whose place in the whole stream is this replica's
            keep = np.flatnonzero((self._offset + np.arange(left)) % n == k)
            keep = keep[:self.batch_size - done]
            rows = self.row_perm[self.current_row + keep]
            for t, a in zip(top, self.arrays):
                chunk = a[rows]
                t.data[done:done + len(rows)] = chunk if self.xp is np else self.xp.asarray(chunk)
            done += len(rows)
            used = int(keep[-1]) + 1 if done == self.batch_size and len(keep) else left
            self._offset += used
            self.current_row += used
            if self.current_row == len(self.row_perm):
                self._next_file()

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        k, n = getattr(self, "_replica", (0, 1))
        if n > 1:
            self._forward_replica(top, k, n)
            return
        done = 0
        # one slice per file segment the batch spans (a loop over files, not rows)
        while done < self.batch_size:
            take = min(self.batch_size - done, len(self.row_perm) - self.current_row)
            rows = self.row_perm[self.current_row:self.current_row + take]
            for t, a in zip(top, self.arrays):
                chunk = a[rows]
                t.data[done:done + take] = chunk if self.xp is np else self.xp.asarray(chunk)
            done += take
            self.current_row += take
            if self.current_row == len(self.row_perm):
                self._next_file()

    def get_state(self) -> bytes:
        return json.dumps({"rng": self.rng.bit_generator.state,
                           "file_perm": self.file_perm.tolist(), "file": self.current_file,
                           "row": self.current_row, "row_perm": self.row_perm.tolist(),
                           "offset": self._offset}).encode()

    def set_state(self, state: bytes) -> None:
        s = json.loads(state)
        self.file_perm = np.asarray(s["file_perm"], dtype=np.int64)
        self.current_file = int(s["file"])
        self._load(self.filenames[self.file_perm[self.current_file]])
        self.row_perm = np.asarray(s["row_perm"], dtype=np.int64)
        self.current_row = int(s["row"])
        self._offset = int(s.get("offset", 0))
        self.rng.bit_generator.state = s["rng"]  # after _load, which may have drawn from it


# == HDF5Output ================================================================================
@register_layer("HDF5Output")
class HDF5Output(Layer):
    """Writes its two bottoms to an HDF5 file as datasets ``data`` and ``label``.

    Params (``hdf5_output_param``): file_name (created, or truncated, at setup).

    Shapes:
        bottom[0]: (N, ...) data; bottom[1]: (N, ...) labels, the same N. Both are stored
            with Caffe's 4-axis legacy shape (N, C, H, W), trailing axes padded with 1
            (e.g. labels (N,) become (N, 1, 1, 1)); blobs of more than 4 axes keep theirs.
        no tops.

    Forward: appends the batch's rows to the datasets (they grow along axis 0 over
    forwards; every batch must have the same row shape), in the layer's dtype; the file is
    closed after each write so it can be read at any time. Backward passes nothing (Caffe's
    backward is empty too).
    """

    exact_num_bottom = 2
    exact_num_top = 0

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.file_name = self.layer_param.hdf5_output_param.file_name
        self.require(bool(self.file_name), "hdf5_output_param.file_name", "no file name given")
        try:
            _h5py().File(self.file_name, "w").close()
        except OSError as e:
            raise errors.DataError(
                f"{errors.layer_where(self.layer_param, self.location)}, field "
                f"hdf5_output_param.file_name: failed to open HDF5 file "
                f"{self.file_name!r}: {e}") from None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.require(bottom[0].shape[:1] == bottom[1].shape[:1], "bottom",
                     f"data and label must have the same batch size; got {bottom[0].shape} "
                     f"and {bottom[1].shape}")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        to_host = self.backend.to_host
        with _h5py().File(self.file_name, "a") as f:
            for name, b in zip(("data", "label"), bottom):
                arr = np.asarray(to_host(b.data), dtype=self.dtype)
                arr = arr.reshape(_legacy(arr.shape))
                if name not in f:
                    f.create_dataset(name, data=arr, maxshape=(None, *arr.shape[1:]),
                                     chunks=True)
                    continue
                ds = f[name]
                self.require(ds.shape[1:] == arr.shape[1:], "bottom",
                             f"{name!r} rows of shape {arr.shape[1:]} cannot be appended to "
                             f"{self.file_name!r}, whose rows have shape {ds.shape[1:]}")
                n = ds.shape[0]
                ds.resize(n + arr.shape[0], axis=0)
                ds[n:] = arr

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        """Nothing: HDF5Output passes no gradient."""


def _legacy(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape + (1,) * (4 - len(shape)) if len(shape) < 4 else shape
