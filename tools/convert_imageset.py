#!/usr/bin/env python
"""Convert a set of images to a database of Datum records, as Caffe's convert_imageset.

Usage: convert_imageset.py [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
LISTFILE holds one "relative/path label" per line (the label follows the last space).
Each image ROOTFOLDER/relative/path becomes a Datum under the key %08d_<relative/path>
(its line index after --shuffle): C x H x W uint8 in BGR order (OpenCV's), or 1 channel
with --gray; with --encoded, the image file's bytes instead (re-encoded when resized or
when --encode_type differs from the file's type). Images that cannot be read are logged
and skipped. The database is built under a temporary name and renamed, so an interrupted
run leaves nothing behind; an existing DB_NAME is an error (Caffe's too).

Example:
    python tools/convert_imageset.py --resize_height 32 --resize_width 32 --shuffle \\
        data/images/ data/images/train.txt data/train_lmdb
"""

from __future__ import annotations

import sys

import _tool

from pycaffe_mpi import datasets


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("root_folder", help="folder the list file's paths are relative to")
    ap.add_argument("listfile", help='text file of "relative/path label" lines')
    ap.add_argument("db_name", help="database directory to create")
    ap.add_argument("--gray", action="store_true",
                    help="treat images as grayscale ones (1 channel)")
    ap.add_argument("--shuffle", action="store_true",
                    help="randomly shuffle the order of images and their labels")
    ap.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                    help="the backend for storing the result (default: %(default)s)")
    ap.add_argument("--resize_width", type=int, default=0,
                    help="width images are resized to (0: no resizing)")
    ap.add_argument("--resize_height", type=int, default=0,
                    help="height images are resized to (0: no resizing)")
    ap.add_argument("--check_size", action="store_true",
                    help="check that all the images have the same size")
    ap.add_argument("--encoded", action="store_true",
                    help="store the encoded image in the Datum")
    ap.add_argument("--encode_type", default="",
                    help="type of the encoding (png, jpg, ...); implies --encoded "
                         "(default: the file's own type)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed for --shuffle (our extension; default: random)")
    args = ap.parse_args(argv)

    def body() -> int:
        n = datasets.convert_imageset(
            args.root_folder, args.listfile, args.db_name, gray=args.gray,
            shuffle=args.shuffle, backend=args.backend, resize_height=args.resize_height,
            resize_width=args.resize_width, check_size=args.check_size, encoded=args.encoded,
            encode_type=args.encode_type, seed=args.seed)
        print(f"wrote {n} records to {args.db_name}")
        return 0

    return _tool.run("convert_imageset", body)


if __name__ == "__main__":
    sys.exit(main())
