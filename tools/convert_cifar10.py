#!/usr/bin/env python
"""Convert CIFAR-10 binary batches to LMDBs, as Caffe's convert_cifar_data.

Reads INPUT_FOLDER/data_batch_1..5.bin and test_batch.bin and writes
OUTPUT_FOLDER/cifar10_train_lmdb (50,000 records) and cifar10_test_lmdb (10,000): Datum 3x32x32
(the raw R, G, B planes) + label, keys %05d; with BACKEND leveldb, cifar10_train_leveldb and
cifar10_test_leveldb (Caffe's names). Existing databases are checked, not rewritten. Use
tools/get_cifar10.py to obtain and verify the batches and to compute the mean as well.

Example:
    python tools/convert_cifar10.py data/cifar10 data/cifar10
"""

from __future__ import annotations

import sys

import _tool

from pycaffe_mpi import datasets


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("input_folder", help="folder with the six CIFAR-10 .bin batches")
    ap.add_argument("output_folder", help="folder for cifar10_train_lmdb and cifar10_test_lmdb")
    ap.add_argument("backend", nargs="?", default="lmdb", choices=("lmdb", "leveldb"),
                    help="database type (default: %(default)s)")
    args = ap.parse_args(argv)

    def body() -> int:
        train, test = datasets.convert_cifar10(args.input_folder, args.output_folder,
                                               args.backend)
        print(f"{train}\n{test}")
        return 0

    return _tool.run("convert_cifar10", body)


if __name__ == "__main__":
    sys.exit(main())
