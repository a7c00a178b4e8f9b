#!/usr/bin/env python
"""Compute the per-pixel mean of a Datum LMDB or LevelDB, as Caffe's compute_image_mean.

Usage mirrors Caffe's tool: compute_image_mean.py [--backend lmdb|leveldb] INPUT_DB [OUTPUT_FILE].
Without --backend the type is read from INPUT_DB's files. Encoded records (convert_imageset
--encoded) are decoded first, as stored.
The mean over all records (sum per pixel / count) is written to OUTPUT_FILE as a BlobProto with
legacy dims 1 x C x H x W (what transform_param.mean_file reads); without OUTPUT_FILE it is only
computed and its per-channel values printed.

Example:
    python tools/compute_image_mean.py data/cifar10/cifar10_train_lmdb data/cifar10/mean.binaryproto
"""

from __future__ import annotations

import sys

import _tool

from pycaffe_mpi import datasets
from pycaffe_mpi import snapshot as pio


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("input_db", help="LMDB or LevelDB directory of Datum records")
    ap.add_argument("output_file", nargs="?", help="where to write the mean .binaryproto")
    ap.add_argument("--backend", default=None, choices=("lmdb", "leveldb"),
                    help="database type (default: detected from INPUT_DB's files)")
    args = ap.parse_args(argv)

    def body() -> int:
        mean = datasets.compute_image_mean(args.input_db, args.backend)
        if args.output_file:
            pio.write_binaryproto(args.output_file, mean, legacy=True)
        for c, v in enumerate(mean.reshape(mean.shape[1], -1).mean(axis=1)):
            print(f"mean_value channel [{c}]: {v:.6g}")
        if args.output_file:
            print(f"wrote {args.output_file} (shape {mean.shape})")
        return 0

    return _tool.run("compute_image_mean", body)


if __name__ == "__main__":
    sys.exit(main())
