#!/usr/bin/env python
"""Convert an IDX image file and its label file (MNIST, Fashion-MNIST) to an LMDB.

As Caffe's convert_mnist_data: each image becomes a Datum 1xHxW uint8 with its label, keys %08d.
The IDX files may be gzipped. The database is written under a temporary name and renamed, so an
interrupted run leaves nothing behind; an existing OUTPUT_DB is an error unless --overwrite.

Example:
    python tools/convert_idx.py /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \\
        /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz data/fmnist_train_lmdb
"""

from __future__ import annotations

import sys

import _tool

from pycaffe_mpi import datasets


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("input_image_file", help="IDX images, N x H x W uint8 (.gz or raw)")
    ap.add_argument("input_label_file", help="IDX labels, N (.gz or raw)")
    ap.add_argument("output_db", help="LMDB directory to create")
    ap.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                    help="database type (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output_db")
    args = ap.parse_args(argv)

    def body() -> int:
        n = datasets.convert_idx(args.input_image_file, args.input_label_file, args.output_db,
                                 overwrite=args.overwrite, backend=args.backend)
        print(f"wrote {n} records to {args.output_db}")
        return 0

    return _tool.run("convert_idx", body)


if __name__ == "__main__":
    sys.exit(main())
