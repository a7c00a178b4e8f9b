"""The oracle-assignment figure of an ensemble (Fig. 2 of "Why M Heads are Better than One").

The matrix has one row per member and one column per class; cell (m, c) is the share of class
c's test examples that member m wins (the member with the highest true-class probability).
:func:`write_assignment` writes it as ``<prefix>.csv`` (header ``member,<class>,…``, row m =
``m,share,…`` with 4 decimals) and ``<prefix>.png``: members × classes as coloured cells with
their values written in, class names when given, a colour bar and the iteration in the title.
``pycaffe-mpi assignment CSV -o PNG [--labels FILE]`` draws the figure again from a CSV.

The EnsembleAccuracy layer only measures: after a test pass it returns an :class:`Assignment`
(the matrix, the example count and its class names); :meth:`Net.end_test_pass` hands what its
layers returned to :func:`write_reports`, which writes ``<prefix>_<layer>_assignment.csv|.png``
and logs the matrix. The solver's test pass and ``pycaffe-mpi test`` both end that way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as io_mod

log = logging.getLogger("pycaffe_mpi")


@dataclasses.dataclass
class Assignment:
    """An oracle assignment measured over one test pass (what EnsembleAccuracy returns).

    Attributes:
        share: (M, C) float64; share[m, c] = the fraction of class c's examples won by member m
            (0 for a class never seen).
        examples: how many (non-ignored) examples the pass counted.
        class_names: C names for the figure and the CSV header, or None (class indices).
    """

    share: np.ndarray
    examples: int
    class_names: list[str] | None = None


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a label file, one name per line (blank lines at the end ignored), as
    Caffe's ``synset_words.txt`` or CIFAR-10's ``batches.meta.txt``."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except OSError as e:
        raise errors.DataError(f"cannot read the label file {path}: {e.strerror or e}") from None
    while names and not names[-1]:
        names.pop()
    return names


def _as_matrix(matrix: Any, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    share = np.asarray(matrix, dtype=np.float64)
    if share.ndim != 2 or 0 in share.shape:
        raise errors.PycaffeError(f"an assignment matrix is members x classes, got shape "
                                  f"{share.shape}")
    if class_names is None:
        return share, [str(c) for c in range(share.shape[1])]
    names = [str(n) for n in class_names]
    if len(names) != share.shape[1]:
        raise errors.PycaffeError(f"{len(names)} class names for {share.shape[1]} classes; the "
                                  "label file needs one name per class, in label order")
    return share, names


def assignment_csv(matrix: Any, class_names: Sequence[str] | None = None) -> str:
    """The CSV text of a matrix: header ``member,<class>,…``, then ``m,v,…`` (4 decimals)."""
    share, names = _as_matrix(matrix, class_names)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["member", *names])
    for m, row in enumerate(share):
        writer.writerow([m, *(f"{v:.4f}" for v in row)])
    return buf.getvalue()


def read_assignment_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """The matrix and the class names (header) of an assignment CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        names = rows[0][1:]
        share = np.array([[float(v) for v in r[1:]] for r in rows[1:] if r], dtype=np.float64)
    except (OSError, IndexError, ValueError) as e:
        raise errors.DataError(f"{path}: not an assignment CSV ({e})") from None
    return share.reshape(-1, len(names)), names


def assignment_figure(matrix: Any, iteration: int | None = None,
                      class_names: Sequence[str] | None = None, title: str | None = None) -> Any:
    """A matplotlib Figure of the matrix: one cell per (member, class), its value written in.

    The colour scale runs from 0 to 1 (shares) unless a value lies outside; NaN cells are grey.
    The size grows with the matrix so that labels and values stay readable; past about 30
    classes or members the cells shrink and their values are left out (the CSV has them).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    share, names = _as_matrix(matrix, class_names)
    n_members, n_classes = share.shape
    finite = share[np.isfinite(share)]
    lo, hi = 0.0, 1.0
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        lo, hi = float(finite.min()), float(finite.max())
    widest = max(len(n) for n in names)
    rotate = widest > 3 and n_classes > 4
    # cells shrink for many classes or members, so that 100 classes still fit a page
    cell_w = 0.8 if n_classes <= 20 else max(0.15, 16.0 / n_classes)
    cell_h = 0.55 if n_members <= 16 else max(0.15, 9.0 / n_members)
    annotate = cell_w >= 0.5 and cell_h >= 0.3
    fig = Figure(figsize=(max(5.0, 2.0 + cell_w * n_classes),
                          max(3.0, 1.6 + cell_h * n_members + (0.07 * widest if rotate else 0))),
                 dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = _colour_map()
    image = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=lo, vmax=hi, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the class won", fraction=0.05, pad=0.02)
    if cell_w >= 0.5:
        ax.set_xticks(range(n_classes), names, rotation=45 if rotate else 0,
                      ha="right" if rotate else "center")
    else:  # narrow cells: small upright labels
        ax.set_xticks(range(n_classes), names, rotation=90, fontsize=6)
    ax.set_yticks(range(n_members), [str(m) for m in range(n_members)],
                  fontsize=None if cell_h >= 0.3 else 6)
    ax.set_xlabel("class")
    ax.set_ylabel("member")
    if annotate:  # the grid between cells comes from minor ticks at the cell borders
        ax.set_xticks(np.arange(n_classes + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n_members + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
    size = 9 if n_classes <= 12 else 7
    for m in range(n_members if annotate else 0):
        for c in range(n_classes):
            v = share[m, c]
            if not math.isfinite(v):
                ax.text(c, m, "–", ha="center", va="center", fontsize=size)
                continue
            r, g, b, _ = cmap((v - lo) / (hi - lo) if hi > lo else 0.0)
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(c, m, f"{v:.2f}", ha="center", va="center", color=ink, fontsize=size)
    if title is None:
        title = "Oracle assignment" + (f" at iteration {iteration}" if iteration is not None
                                       else "")
    ax.set_title(title)
    return fig


def _colour_map() -> Any:
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#c8c8c8")


def write_assignment(matrix: Any, out_prefix: str | os.PathLike, iteration: int | None,
                     class_names: Sequence[str] | str | os.PathLike | None = None
                     ) -> tuple[str, str]:
    """Write ``<out_prefix>.csv`` and ``<out_prefix>.png`` (each atomically; the directory is
    created) and return their paths.

    Args:
        matrix: (M, C) shares, members × classes.
        out_prefix: path without suffix, e.g. ``<snapshot_prefix>_iter_500_accuracy_assignment``.
        iteration: the solver iteration, shown in the title.
        class_names: C names, or the path of a label file (:func:`read_class_names`); class
            indices when None.
    """
    if isinstance(class_names, (str, os.PathLike)):
        class_names = read_class_names(class_names)
    out_prefix = os.fspath(out_prefix)
    if os.path.dirname(out_prefix):
        os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
    text = assignment_csv(matrix, class_names)
    fig = assignment_figure(matrix, iteration, class_names)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    csv_path, png_path = out_prefix + ".csv", out_prefix + ".png"
    io_mod.atomic_write(csv_path, text.encode("utf-8"))
    io_mod.atomic_write(png_path, png.getvalue())
    return csv_path, png_path


def write_reports(reports: Sequence[tuple[str, Any]], prefix: str | None,
                  iteration: int | None = None) -> list[str]:
    """Write what layers returned from a test pass (``(layer name, report)`` pairs) and return
    the paths written.

    Each :class:`Assignment` becomes ``<prefix>_<layer>_assignment.csv`` and ``.png`` ("/" in
    the layer name becomes "_") and is logged row by row (with ``prefix`` None: logged only);
    other reports are ignored.
    """
    paths: list[str] = []
    for name, report in reports:
        if not isinstance(report, Assignment):
            continue
        if prefix is not None:
            base = f"{prefix}_{name.replace('/', '_')}_assignment"
            paths += write_assignment(report.share, base, iteration, report.class_names)
        classes = (" ".join(report.class_names) if report.class_names
                   else f"0..{report.share.shape[1] - 1}")
        log.info("%s: oracle assignment over %d examples (rows: members, columns: classes "
                 "%s, share of the class won)", name, report.examples, classes,
                 extra={"all_ranks": True})
        for m, row in enumerate(report.share):
            log.info("%s: member %d: %s", name, m, " ".join(f"{v:.2f}" for v in row),
                     extra={"all_ranks": True})
    return paths


# -- command line ------------------------------------------------------------------------------
DESCRIPTION = ("Draw an oracle-assignment CSV (members x classes, as the EnsembleAccuracy layer "
               "writes it) as a figure, with class names from a label file.")


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the assignment command's arguments to ``parser``."""
    parser.add_argument("csv", metavar="CSV", help="assignment CSV (header member,<class>,...)")
    parser.add_argument("-o", "--output", required=True, metavar="PNG", help="image to write")
    parser.add_argument("--labels", metavar="FILE", help="class names, one per line")
    parser.add_argument("--iteration", type=int, help="iteration for the title")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``assignment`` on an ``argparse`` subparsers object; ``run`` is its handler."""
    p = subparsers.add_parser("assignment", help="oracle-assignment CSV as a figure",
                              description=DESCRIPTION)
    configure(p)
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handle parsed ``assignment`` arguments; 0 on success."""
    share, header = read_assignment_csv(args.csv)
    names = read_class_names(args.labels) if args.labels else header
    fig = assignment_figure(share, args.iteration, names)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    if os.path.dirname(args.output):
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
    io_mod.atomic_write(args.output, png.getvalue())
    print(f"Wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``assignment`` as a program of its own (``python -m pycaffe_mpi.reports.assignment``)."""
    parser = configure(argparse.ArgumentParser(prog="assignment", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except errors.PycaffeError as e:
        print(f"assignment: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
