#!/usr/bin/env python
"""Parse a training log into <LOG>.train and <LOG>.test CSV tables, as Caffe's
tools/extra/parse_log.py does (same arguments: LOG [OUTPUT_DIR]; also -o DIR).

Reads our logs (also with "[rank r/n]" tags), BVLC Caffe's logs and JSON-lines results files.
The same as `pycaffe-mpi parse-log`; see pycaffe_mpi/reports/parse_log.py.

Example:
    python tools/parse_log.py models/cifar10_mcl/train.log /tmp/tables
"""

from __future__ import annotations

import sys

import _tool  # noqa: F401  (puts an uninstalled checkout on sys.path)

from pycaffe_mpi.reports import parse_log

if __name__ == "__main__":
    sys.exit(parse_log.main())
