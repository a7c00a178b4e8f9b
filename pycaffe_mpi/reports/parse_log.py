"""Train and test tables from a run: our logs, BVLC Caffe's glog logs, or a results file.

``pycaffe-mpi parse-log LOG -o DIR`` writes ``DIR/<LOG name>.train`` and ``.test`` as Caffe's
``tools/extra/parse_log.py`` does: CSV with the columns ``NumIters, Seconds, LearningRate`` and
then every net output by name, one row per display iteration (train) or test pass (test).

What is read from a log (glog lines ``I1128 02:28:11.123456 12345 solver.py:218] message``,
also with our ``[rank r/n]`` tag, or plain messages without the glog head):

- ``Iteration N (… iter/s, …), loss = x`` / ``Iteration N, loss = x``: the current iteration;
- ``Iteration N, lr = x``: the learning rate of iteration N;
- ``Iteration N, Testing net (#i)``: a test pass of test net i begins;
- ``Train net output #k: name = x`` and ``Test net output #k: name = x``: a table cell.

``Seconds`` count from the "Solving" line (else from the first line with a time), as Caffe's
script counts; the year is not in glog lines, so a log that spans New Year is followed by its
month turning back. Where Caffe's script keeps only the last of several outputs with one name,
these tables keep all of them (see :func:`parse_log`).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import dataclasses
import datetime
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from pycaffe_mpi import errors
from pycaffe_mpi.reports import results

log = logging.getLogger("pycaffe_mpi")

Row = dict[str, float]
FIXED_COLUMNS = ("NumIters", "Seconds", "LearningRate")

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf))"
_HEAD = re.compile(r"[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+)\s+\d+\s+[^\]\s]+\] ?")
_RANK = re.compile(r"\s*\[rank (\d+)/\d+\]\s*")
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_LR = re.compile(r"Iteration (\d+), lr = " + _NUM)
_DISPLAY = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = ")
_ITERATION = re.compile(r"Iteration (\d+)")
_OUTPUT = re.compile(r"(Train|Test) net output #\d+: (\S+) = " + _NUM)


@dataclasses.dataclass
class _Pass:
    """The outputs of one display iteration or one test iteration, by (test net, rank)."""

    iteration: int
    seconds: float
    values: dict[tuple[int, int], list[tuple[str, float]]] = dataclasses.field(
        default_factory=dict)


class _Table:
    """Cells gathered pass by pass; :meth:`rows` names the columns once all are known."""

    def __init__(self) -> None:
        self.passes: dict[int, _Pass] = {}

    def start(self, iteration: int, seconds: float) -> None:
        self.passes.setdefault(iteration, _Pass(iteration, seconds))

    def add(self, iteration: int, seconds: float, net: int, rank: int, name: str,
            value: float) -> None:
        self.start(iteration, seconds)
        p = self.passes[iteration]
        if not p.values:  # as Caffe's script: the time the first value of the pass was logged
            p.seconds = seconds
        p.values.setdefault((net, rank), []).append((name, value))

    def rows(self, lr_of: dict[int, float]) -> list[Row]:
        """One row per pass with values, in iteration order.

        Column names: an output name met several times in one pass of one net and rank (a
        vector output logged element by element) becomes ``name_0, name_1, …``; a name reported
        by several test nets or ranks keeps its plain form for the lowest (test net, rank) and
        gets ``@test<i>`` / ``@rank<r>`` for the others.
        """
        numbered = {it: {key: _number_repeats(vals) for key, vals in p.values.items()}
                    for it, p in self.passes.items()}
        owners: dict[str, list[tuple[int, int]]] = {}
        for per_key in numbered.values():
            for key, vals in per_key.items():
                for name, _ in vals:
                    keys = owners.setdefault(name, [])
                    if key not in keys:
                        keys.append(key)
        first = {name: min(keys) for name, keys in owners.items()}
        lr_iters = sorted(lr_of)
        out = []
        for it in sorted(self.passes):
            if not any(numbered[it].values()):
                continue
            row: Row = {"NumIters": it, "Seconds": self.passes[it].seconds,
                        "LearningRate": _lr_at(lr_of, lr_iters, it)}
            for key in sorted(numbered[it]):
                for name, value in numbered[it][key]:
                    row[_column(name, key, first[name])] = value
            out.append(row)
        return out


def _number_repeats(vals: list[tuple[str, float]]) -> list[tuple[str, float]]:
    counts: dict[str, int] = {}
    for name, _ in vals:
        counts[name] = counts.get(name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for name, v in vals:
        if counts[name] > 1:
            out.append((f"{name}_{seen.get(name, 0)}", v))
            seen[name] = seen.get(name, 0) + 1
        else:
            out.append((name, v))
    return out


def _column(name: str, key: tuple[int, int], first: tuple[int, int]) -> str:
    net, rank = key
    tags = ([f"test{net}"] if net != first[0] else []) + ([f"rank{rank}"] if rank != first[1]
                                                          else [])
    return "@".join([name, *tags])


def _lr_at(lr_of: dict[int, float], iters: list[int], it: int) -> float:
    """The rate logged for ``it``, else the last one logged before it, else the first one logged
    (Caffe logs the rate after the first outputs; its script copies it back the same way)."""
    if not iters:
        return math.nan
    i = bisect.bisect_right(iters, it)
    return lr_of[iters[i - 1]] if i else lr_of[iters[0]]


class _Clock:
    """glog times (month, day, time; no year) as seconds from the start of the run."""

    def __init__(self, year: int) -> None:
        self.year = year
        self.last_month = 0
        self.start: datetime.datetime | None = None

    def time(self, m: re.Match) -> datetime.datetime:
        month, day, hh, mm, ss = (int(g) for g in m.groups()[:5])
        if month < self.last_month:  # the log went past New Year
            self.year += 1
        self.last_month = month
        micro = int((m.group(6) + "000000")[:6])
        return datetime.datetime(self.year, month, day, hh, mm, ss, micro)

    def seconds(self, t: datetime.datetime | None) -> float:
        if t is None or self.start is None:
            return math.nan
        return (t - self.start).total_seconds()


def _float(text: str) -> float:
    return math.nan if text.lower().lstrip("+-") == "nan" else float(text)


def parse_log_lines(lines: Iterable[str], year: int | None = None) -> tuple[list[Row], list[Row]]:
    """:func:`parse_log` on lines of log text (``year``: the year the log started)."""
    clock = _Clock(year or datetime.date.today().year)
    train, test = _Table(), _Table()
    lr_of: dict[int, float] = {}
    iteration, test_net = -1, 0
    for raw in lines:
        head = _HEAD.search(raw)
        t = None
        if head:
            try:
                t = clock.time(head)
            except ValueError:  # a damaged time: keep the line, lose its time
                t = None
            # Caffe counts from "Solving"; a log without it, from its first iteration line
            if clock.start is None and t is not None and ("Solving" in raw or "Iteration" in raw):
                clock.start = t
        msg = raw[head.end():] if head else raw
        rank_tag = _RANK.match(msg)
        rank = int(rank_tag.group(1)) if rank_tag else 0
        msg = msg[rank_tag.end():] if rank_tag else msg.strip()
        if (m := _TESTING.search(msg)) is not None:
            iteration, test_net = int(m.group(1)), int(m.group(2))
            test.start(iteration, clock.seconds(t))
        elif (m := _LR.search(msg)) is not None:
            iteration = int(m.group(1))
            lr_of[iteration] = _float(m.group(2))
        elif (m := _DISPLAY.search(msg)) is not None:
            iteration = int(m.group(1))
            train.start(iteration, clock.seconds(t))
        elif (m := _OUTPUT.search(msg)) is not None and iteration >= 0:
            table, net = (train, 0) if m.group(1) == "Train" else (test, test_net)
            table.add(iteration, clock.seconds(t), net, rank, m.group(2), _float(m.group(3)))
        elif (m := _ITERATION.search(msg)) is not None:
            iteration = int(m.group(1))
    return train.rows(lr_of), test.rows(lr_of)


def parse_results(records: Sequence[dict[str, Any]]) -> tuple[list[Row], list[Row]]:
    """Train and test rows from the records of a results file (:mod:`.results`)."""
    train, test = _Table(), _Table()
    lr_of: dict[int, float] = {}
    for rec in records:
        table = train if rec["kind"] == "train" else test
        if rec["kind"] == "train" and not math.isnan(rec["lr"]):
            lr_of.setdefault(rec["iter"], rec["lr"])
        table.start(rec["iter"], rec["seconds"])
        for name, value in rec["outputs"].items():
            table.add(rec["iter"], rec["seconds"], rec["test_net"], rec["rank"], name, value)
    return train.rows(lr_of), test.rows(lr_of)


def parse_log(path: str | os.PathLike) -> tuple[list[Row], list[Row]]:
    """The train rows and test rows of a log or results file (Caffe's ``parse_log``).

    Each row maps ``NumIters``, ``Seconds`` and ``LearningRate`` and then each output name to
    its value, in the order the outputs were first met. Unlike Caffe's script, an output met
    several times per pass (a vector output logged element by element) becomes ``name_0, …``,
    and the same name from another test net or rank gets ``@test<i>`` / ``@rank<r>``, so no
    value overwrites another.

    Args:
        path: a glog-style log (ours or BVLC Caffe's) or a JSON-lines results file (recognised
            by its first character, "{").

    Raises:
        DataError: the file cannot be read, or a results line is malformed.
    """
    path = os.fspath(path)
    try:
        if results.looks_like_results(path):
            return parse_results(results.read_results(path))
        year = datetime.datetime.fromtimestamp(os.path.getctime(path)).year
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_log_lines(f, year)
    except OSError as e:
        raise errors.DataError(f"cannot read the log {path}: {e.strerror or e}") from None


def columns(rows: Sequence[Row]) -> list[str]:
    """Every column of ``rows``, the fixed three first, then in order of first appearance."""
    names = dict.fromkeys(FIXED_COLUMNS)
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def write_csv(path: str | os.PathLike, rows: Sequence[Row], delimiter: str = ",") -> None:
    """``rows`` as CSV with a header (a cell a row lacks is left empty)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), delimiter=delimiter, restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | os.PathLike, delimiter: str = ",") -> list[Row]:
    """The rows of a ``.train`` / ``.test`` table (ours or Caffe's); empty cells are left out."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f, delimiter=delimiter)]


def save_csv_files(log_path: str | os.PathLike, output_dir: str | os.PathLike,
                   train: Sequence[Row], test: Sequence[Row], delimiter: str = ",") -> list[str]:
    """Write ``<output_dir>/<log name>.train`` and ``.test``; a table without rows is not
    written (as Caffe's script does). Returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(os.fspath(output_dir), os.path.basename(os.fspath(log_path)))
    written = []
    for suffix, rows in ((".train", train), (".test", test)):
        if rows:
            write_csv(base + suffix, rows, delimiter)
            written.append(base + suffix)
        else:
            log.info("Not writing %s: no %s rows", base + suffix, suffix[1:])
    return written


# -- command line ------------------------------------------------------------------------------
DESCRIPTION = ("Parse a training log (ours or BVLC Caffe's) or a results file into two CSV "
               "tables, <LOG>.train and <LOG>.test, as Caffe's tools/extra/parse_log.py does.")


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add parse-log's arguments to ``parser``."""
    parser.add_argument("logfile_path", metavar="LOG", help="log file or JSON-lines results file")
    parser.add_argument("output_dir", nargs="?", default=None,
                        help="directory for the CSV files (Caffe's positional form of -o)")
    parser.add_argument("-o", "--output-dir", dest="output_opt", metavar="DIR",
                        help="directory for the CSV files (default: the log's directory)")
    parser.add_argument("--delimiter", default=",",
                        help="column delimiter (default: '%(default)s')")
    parser.add_argument("--verbose", action="store_true", help="print the files written")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``parse-log`` on an ``argparse`` subparsers object; ``run`` is its handler."""
    p = subparsers.add_parser("parse-log", help="training log to train/test CSV tables",
                              description=DESCRIPTION)
    configure(p)
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handle parsed ``parse-log`` arguments; 0 on success."""
    if args.output_dir and args.output_opt and args.output_dir != args.output_opt:
        raise errors.PycaffeError("give the output directory once (positional or -o), not both")
    out_dir = args.output_opt or args.output_dir or os.path.dirname(args.logfile_path) or "."
    train, test = parse_log(args.logfile_path)
    written = save_csv_files(args.logfile_path, out_dir, train, test, args.delimiter)
    if not written:
        raise errors.DataError(f"{args.logfile_path}: no train or test outputs found")
    if args.verbose:
        for path in written:
            print(f"Wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``parse-log`` as a program of its own (``python -m pycaffe_mpi.reports.parse_log``)."""
    parser = configure(argparse.ArgumentParser(prog="parse-log", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except errors.PycaffeError as e:
        print(f"parse-log: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
