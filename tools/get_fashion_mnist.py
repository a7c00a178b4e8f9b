#!/usr/bin/env python
"""Get Fashion-MNIST ready for Caffe-style training: LMDBs and the mean file.

Reads the gzipped IDX files of the Debian package dataset-fashion-mnist (install it with
`apt-get install dataset-fashion-mnist`; files in /usr/share/datasets/fashion-mnist) and writes,
as Caffe's convert_mnist_data, fashion_mnist_train_lmdb (60,000 records) and
fashion_mnist_test_lmdb (10,000), Datum 1x28x28 with keys %08d, plus mean.binaryproto (per-pixel
mean of the training set, legacy 1x1x28x28 BlobProto). Existing outputs are verified and skipped.

Example:
    python tools/get_fashion_mnist.py                # into data/fashion_mnist
"""

from __future__ import annotations

import sys
import time

import _tool

from pycaffe_mpi import datasets


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("--data-dir", default="data/fashion_mnist",
                    help="where the LMDBs and the mean go (default: %(default)s)")
    ap.add_argument("--src", default=datasets.FASHION_MNIST_SRC,
                    help="folder of the *-idx?-ubyte[.gz] files (default: %(default)s)")
    args = ap.parse_args(argv)
    t0 = time.time()

    def body() -> int:
        paths = datasets.get_fashion_mnist(args.data_dir, args.src)
        print(f"Fashion-MNIST ready in {time.time() - t0:.1f} s:")
        for role, p in paths.items():
            print(f"  {role:9s} {p}")
        return 0

    return _tool.run("get_fashion_mnist", body)


if __name__ == "__main__":
    sys.exit(main())
