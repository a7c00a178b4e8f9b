"""IDX files (MNIST's format) and Fashion-MNIST's LMDBs + mean.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``. Layout written (Caffe's
``convert_mnist_data``)::

    <data_dir>/fashion_mnist_train_lmdb  60,000 Datum 1x28x28, keys %08d
    <data_dir>/fashion_mnist_test_lmdb   10,000 Datum 1x28x28, keys %08d
    <data_dir>/mean.binaryproto          BlobProto 1x1x28x28
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi.datasets import datum_db
from pycaffe_mpi.datasets.datum_db import PathLike

FASHION_MNIST_SRC = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_COUNTS = {"train": 60000, "test": 10000}
FASHION_MNIST_SHAPE = (1, 28, 28)
FASHION_MNIST_DB = {"train": "fashion_mnist_train_lmdb", "test": "fashion_mnist_test_lmdb"}
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (MNIST's format; gzipped or not) as an array of its native shape.

    Format: 2 zero bytes, a type byte (0x08 uint8 … 0x0E float64), the number of axes, one
    big-endian uint32 per axis, then the values big-endian in C order.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise errors.DataError(f"IDX file {path} does not exist") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise errors.DataError(f"{path}: broken gzip stream: {e}") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise errors.DataError(f"{path} is not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    count = int(np.prod(dims, dtype=np.int64))
    if len(body) != count * dtype.itemsize:
        raise errors.DataError(f"{path}: shape {dims} needs {count * dtype.itemsize} bytes of "
                               f"values, the file has {len(body)}")
    return np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("="), copy=False) \
        .reshape(dims)


def convert_idx(images_path: PathLike, labels_path: PathLike, db_path: PathLike,
                overwrite: bool = False, backend: str = "lmdb") -> int:
    """Caffe's ``convert_mnist_data``: IDX images (N×H×W uint8) + labels to a Datum LMDB (or,
    with ``backend="leveldb"``, a LevelDB).

    Records are 1×H×W with keys ``%08d``. Returns the number of records.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise errors.DataError(f"{images_path}: expected N x H x W uint8 images, got "
                               f"{images.shape} {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise errors.DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                               f"holds labels of shape {labels.shape}")
    datum_db.write_datum_db(db_path, images[:, None], labels, "%08d", overwrite=overwrite,
                            backend=backend)
    return len(images)


def _idx_source(src: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (src / name).is_file():
            return src / name
    raise errors.DataError(
        f"{src / (stem + '.gz')} does not exist; Fashion-MNIST comes from the Debian package "
        "dataset-fashion-mnist: apt-get install dataset-fashion-mnist (or pass --src DIR)")


def get_fashion_mnist(data_dir: PathLike = "data/fashion_mnist",
                      src: PathLike = FASHION_MNIST_SRC) -> dict[str, Path]:
    """Fashion-MNIST's IDX files to ``fashion_mnist_{train,test}_lmdb`` and ``mean.binaryproto``.

    Returns:
        paths by role: ``train_db``, ``test_db``, ``mean``.
    """
    data_dir, src = Path(data_dir), Path(src)
    paths: dict[str, Path] = {}
    for split in ("train", "test"):
        db = data_dir / FASHION_MNIST_DB[split]
        img_stem, lab_stem = FASHION_MNIST_FILES[split]

        def build(db: Path = db, img_stem: str = img_stem, lab_stem: str = lab_stem) -> None:
            convert_idx(_idx_source(src, img_stem), _idx_source(src, lab_stem), db)

        datum_db.ensure_lmdb(db, FASHION_MNIST_COUNTS[split], FASHION_MNIST_SHAPE, build)
        paths[f"{split}_db"] = db
    paths["mean"] = data_dir / datum_db.MEAN_FILE
    datum_db.ensure_mean(paths["mean"], paths["train_db"], FASHION_MNIST_SHAPE)
    return paths
