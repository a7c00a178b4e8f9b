#!/usr/bin/env python
"""Plot learning curves of one or more runs on one figure (matplotlib).

Each RUN is a log (ours or BVLC Caffe's), a JSON-lines results file, or a .train/.test table
from parse_log.py. One panel per output (default: every loss and accuracy), one colour per run;
an ensemble run adds its ensemble-mean, oracle and per-member accuracy. Unlike Caffe's
tools/extra/plot_training_log.py there are no numbered chart types: name the outputs with -y
and the axis with -x (iters or seconds). The same as `pycaffe-mpi plot`; see
pycaffe_mpi/reports/plot.py.

Example:
    python tools/plot_training_log.py run_a.log run_b.log -o curves.png -x seconds -y loss
"""

from __future__ import annotations

import sys

import _tool  # noqa: F401  (puts an uninstalled checkout on sys.path)

from pycaffe_mpi.reports import plot

if __name__ == "__main__":
    sys.exit(plot.main())
