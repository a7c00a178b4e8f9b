"""Layer cases for the HDF5 family: HDF5Data, HDF5Output.

Neither has a gradient (grad=False). The HDF5Data cases read two tiny .h5 files (datasets
``t0`` and ``t1``, named like the tops the case builder gives) listed in a text file, all
written with plain h5py calls into a temporary directory when this module is imported
(removed at exit). The HDF5Output reference reads back the file the layer wrote.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

_DIR = tempfile.mkdtemp(prefix="pycaffe-hdf5-case-")
atexit.register(shutil.rmtree, _DIR, True)
_RNG = np.random.default_rng(21)
# two files of 3 and 2 rows: data rows 2x3, labels scalars
_FILES = [
    (_RNG.uniform(-1, 1, (3, 2, 3)), np.array([0.0, 1.0, 2.0])),
    (_RNG.uniform(-1, 1, (2, 2, 3)), np.array([3.0, 4.0])),
]
_LIST = os.path.join(_DIR, "list.txt")
_OUT = os.path.join(_DIR, "out.h5")


def _write_files() -> None:
    import h5py

    names = []
    for i, (data, label) in enumerate(_FILES):
        name = os.path.join(_DIR, f"part{i}.h5")
        with h5py.File(name, "w") as f:
            f["t0"] = data
            f["t1"] = label.astype(np.int32)  # integer datasets are read as numbers too
        names.append(name)
    with open(_LIST, "w") as f:
        f.write("\n".join(names) + "\n")


_write_files()


def _rows_ref(batch: int, ntop: int):
    def ref(bottoms, layer):
        rows = [(d[r], lab[r]) for d, lab in _FILES for r in range(len(lab))]
        data = np.zeros((batch, 2, 3))
        labels = np.zeros(batch)
        for i in range(batch):
            data[i], labels[i] = rows[i % len(rows)]  # wraps round to the first file
        return [data, labels][:ntop]
    return ref


add_case(LayerCase(
    type="HDF5Data", id="two_files_wrap", ntop=2, grad=False, reshape=(),
    proto=f'hdf5_data_param {{ source: "{_LIST}" batch_size: 7 }}',
    reference=_rows_ref(7, 2)))

add_case(LayerCase(
    type="HDF5Data", id="one_top_within_file", ntop=1, grad=False, reshape=(),
    proto=f'hdf5_data_param {{ source: "{_LIST}" batch_size: 2 }}',
    reference=_rows_ref(2, 1)))


def _output_ref(bottoms, layer):
    import h5py

    with h5py.File(layer.file_name, "r") as f:
        for name, b in zip(("data", "label"), bottoms):
            n = b.shape[0]
            legacy = b.shape + (1,) * (4 - b.ndim)
            got = np.asarray(f[name])[-n:]  # the rows this forward appended
            np.testing.assert_allclose(got, b.reshape(legacy), rtol=1e-6,
                                       err_msg=f"dataset {name}")
    return []


add_case(LayerCase(
    type="HDF5Output", id="data_and_label", ntop=0, grad=False,
    proto=f'hdf5_output_param {{ file_name: "{_OUT}" }}',
    bottoms=[(3, 2, 2), (3,)], reference=_output_ref))
