"""Learning curves: loss and any output against iterations or seconds, several runs on one figure.

``pycaffe-mpi plot RUN... -o curves.png`` reads each RUN (a log, ours or BVLC Caffe's; a results
file; or a ``.train``/``.test`` table written by parse-log) and draws one panel per output name,
one colour per run (train solid, test dashed). A run whose test outputs include
``ensemble_accuracy``, ``oracle_accuracy`` and ``member_accuracy_0 … _{M-1}`` also gets a panel
of its own with the ensemble-mean, oracle and per-member accuracy curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import errors
from pycaffe_mpi.reports import parse_log as parse_mod

X_COLUMNS = {"iters": ("NumIters", "iterations"), "seconds": ("Seconds", "seconds")}
_MEMBER = re.compile(r"^member_accuracy_(\d+)$")
_PER_MEMBER = re.compile(r"^member_.*_\d+$")


@dataclasses.dataclass
class Run:
    """One run's tables (rows as :func:`pycaffe_mpi.reports.parse_log.parse_log` returns)."""

    label: str
    train: list[dict[str, float]]
    test: list[dict[str, float]]

    def columns(self, which: str) -> list[str]:
        rows = self.train if which == "train" else self.test
        return [c for c in parse_mod.columns(rows) if c not in parse_mod.FIXED_COLUMNS]

    def members(self) -> list[str]:
        """The per-member accuracy columns of an ensemble run, by member ([] otherwise)."""
        cols = self.columns("test")
        if "ensemble_accuracy" not in cols or "oracle_accuracy" not in cols:
            return []
        found = sorted((int(m.group(1)), c) for c in cols if (m := _MEMBER.match(c)))
        return [c for _, c in found]


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """A run from a log, a results file, or a ``.train``/``.test`` table (its sibling too)."""
    path = os.fspath(path)
    base, ext = os.path.splitext(path)
    if ext in (".train", ".test"):
        tables = {}
        for which in ("train", "test"):
            p = f"{base}.{which}"
            tables[which] = parse_mod.read_csv(p) if os.path.exists(p) else []
        train, test = tables["train"], tables["test"]
        name = os.path.basename(base)
    else:
        train, test = parse_mod.parse_log(path)
        name = os.path.basename(path)
    return Run(label or name, train, test)


def default_outputs(runs: Sequence[Run]) -> list[str]:
    """The names to plot when none are asked for: every loss and accuracy output except the
    per-member ones (an ensemble run's own panel shows those)."""
    names: dict[str, None] = {}
    for run in runs:
        for which in ("train", "test"):
            for c in run.columns(which):
                low = c.lower()
                if ("loss" in low or "accuracy" in low) and not _PER_MEMBER.match(c):
                    names[c] = None
    return list(names)


def _series(rows: Sequence[dict[str, float]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if y in r and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs: Sequence[Run | str | os.PathLike], out_png: str | os.PathLike,
         x: str = "iters", y: Sequence[str] | None = None, title: str | None = None) -> Any:
    """Draw learning curves and save them as a PNG.

    Args:
        runs: :class:`Run` objects or paths for :func:`load_run`.
        out_png: the image to write (its directory is created).
        x: "iters" (``NumIters``) or "seconds" (``Seconds``).
        y: output names, one panel each (default: :func:`default_outputs`); a name found in
            both tables of a run gives a train curve (solid) and a test curve (dashed).
        title: the figure's title (default: none).

    Returns:
        The matplotlib Figure: one Axes per name, then one per ensemble run (ensemble-mean,
        oracle and one curve per member). Each curve is one Line2D of its Axes.

    Raises:
        PycaffeError: ``x`` is unknown, or no run has any of the names asked for.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_COLUMNS:
        raise errors.PycaffeError(f'x must be one of {sorted(X_COLUMNS)}, got "{x}"')
    loaded = [r if isinstance(r, Run) else load_run(r) for r in runs]
    seen: dict[str, int] = {}
    for i, r in enumerate(loaded):  # a legend needs distinct names: "run", "run #2", …
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            loaded[i] = dataclasses.replace(r, label=f"{r.label} #{seen[r.label]}")
    names = list(y) if y else default_outputs(loaded)
    known = {c for r in loaded for w in ("train", "test") for c in r.columns(w)}
    missing = [n for n in names if n not in known]
    if missing or not names:
        raise errors.PycaffeError(
            f"nothing to plot: {', '.join(missing) or 'a loss or accuracy output'} not found "
            f"in the runs; their outputs: {', '.join(sorted(known)) or 'none'}")
    ensembles = [r for r in loaded if r.members()]
    n_panels = len(names) + len(ensembles)
    fig = Figure(figsize=(9, 2.2 + 2.8 * n_panels), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    xcol, xlabel = X_COLUMNS[x]
    colours = [f"C{i % 10}" for i in range(len(loaded))]
    for ax, name in zip(axes, names):
        for run, colour in zip(loaded, colours):
            both = name in run.columns("train") and name in run.columns("test")
            for which, style in (("train", "-"), ("test", "--")):
                xs, ys = _series(run.train if which == "train" else run.test, xcol, name)
                if xs:
                    label = f"{run.label} ({which})" if both else run.label
                    ax.plot(xs, ys, style, color=colour, label=label,
                            marker="o" if which == "test" and len(xs) < 30 else None, ms=3)
        _finish(ax, name, xlabel)
    for ax, run in zip(axes[len(names):], ensembles):
        _ensemble_panel(ax, run, xcol)
        _finish(ax, f"{run.label}: ensemble accuracy", xlabel)
    if title:
        fig.suptitle(title)
    out_png = os.fspath(out_png)
    if os.path.dirname(out_png):
        os.makedirs(os.path.dirname(out_png), exist_ok=True)
    fig.savefig(out_png, format="png")
    return fig


def _ensemble_panel(ax: Any, run: Run, xcol: str) -> None:
    """Ensemble-mean (thick), oracle (dashed) and each member (thin, coloured) of one run."""
    for i, col in enumerate(run.members()):
        xs, ys = _series(run.test, xcol, col)
        ax.plot(xs, ys, "-", lw=1, alpha=0.8, color=f"C{(i + 2) % 10}", label=f"member {i}")
    xs, ys = _series(run.test, xcol, "ensemble_accuracy")
    ax.plot(xs, ys, "-", lw=2.5, color="C0", label="ensemble mean")
    xs, ys = _series(run.test, xcol, "oracle_accuracy")
    ax.plot(xs, ys, "--", lw=2.5, color="C1", label="oracle")


def _finish(ax: Any, name: str, xlabel: str) -> None:
    ax.set_title(name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(name.split("@")[0])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")


# -- command line ------------------------------------------------------------------------------
DESCRIPTION = ("Plot learning curves of one or more runs (logs, results files or parse-log "
               "tables) on one figure; an ensemble run adds its ensemble-mean, oracle and "
               "per-member accuracy.")


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add plot's arguments to ``parser``."""
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a log, a JSON-lines results file, or a .train/.test table")
    parser.add_argument("-o", "--output", required=True, metavar="PNG", help="image to write")
    parser.add_argument("-x", "--x", dest="x", choices=sorted(X_COLUMNS), default="iters",
                        help="horizontal axis (default: %(default)s)")
    parser.add_argument("-y", "--y", dest="y", action="append", metavar="NAME[,NAME...]",
                        help="outputs to plot, one panel each; repeatable (default: every loss "
                             "and accuracy)")
    parser.add_argument("--label", nargs="+", metavar="LABEL",
                        help="legend names of the runs, in order (default: file names)")
    parser.add_argument("--title", help="figure title")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plot`` on an ``argparse`` subparsers object; ``run`` is its handler."""
    p = subparsers.add_parser("plot", help="learning curves of runs as a PNG",
                              description=DESCRIPTION)
    configure(p)
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handle parsed ``plot`` arguments; 0 on success."""
    labels = list(args.label or [])
    if labels and len(labels) != len(args.runs):
        raise errors.PycaffeError(f"--label gives {len(labels)} names for {len(args.runs)} runs")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(args.runs)]
    names = [n for arg in args.y or () for n in arg.split(",") if n] or None
    plot(runs, args.output, x=args.x, y=names, title=args.title)
    print(f"Wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``plot`` as a program of its own (``python -m pycaffe_mpi.reports.plot``)."""
    parser = configure(argparse.ArgumentParser(prog="plot", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except errors.PycaffeError as e:
        print(f"plot: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
