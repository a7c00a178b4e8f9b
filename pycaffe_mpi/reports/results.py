"""The results file: one JSON object per line, per display and per test pass of a run.

The solver writes it beside its snapshots (:class:`ResultsWriter`); ``pycaffe-mpi parse-log`` and
``pycaffe-mpi plot`` read it as they read a log, and scripts can read it without parsing log text
(:func:`read_results`). One record::

    {"kind": "train", "iter": 100, "lr": 0.001, "seconds": 12.5, "rank": 0,
     "outputs": {"loss": 1.52, "member_accuracy_0": 0.41}}
    {"kind": "test", "iter": 500, "seconds": 60.2, "rank": 0, "test_net": 0,
     "outputs": {"accuracy": 0.71}}

Fields:
    kind: "train" (a display iteration: the train net's outputs) or "test" (a test pass: the mean
        of each test net output over ``test_iter`` batches).
    iter: the solver's iteration (for a test pass, the iteration it tested).
    lr: the learning rate of that iteration (train records only).
    seconds: wall-clock seconds since the solver started.
    rank: the MPI rank that wrote the record (0 for a single process).
    test_net: which test net (test records only).
    outputs: every output by name; an output blob with several elements becomes
        ``name_0 … name_{n-1}``. Non-finite values are the strings "NaN", "Infinity" and
        "-Infinity" (plain JSON has no such numbers; :func:`read_results` turns them back
        into floats).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import IO, Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors

KINDS = ("train", "test")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _number(v: float) -> float | str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def element_names(name: str, count: int) -> list[str]:
    """The names of an output blob's elements wherever a run reports them (log lines, results
    file, ``pycaffe-mpi test``): the blob's name for one element, ``name_0 … name_{n-1}`` for
    n > 1 (e.g. ``member_accuracy_0``), so that Caffe's ``parse_log.py`` keeps every element."""
    return [name] if count == 1 else [f"{name}_{i}" for i in range(count)]


def flatten_outputs(outputs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, float]:
    """Outputs by name as floats, elements named by :func:`element_names`."""
    items = outputs.items() if isinstance(outputs, Mapping) else outputs
    flat: dict[str, float] = {}
    for name, value in items:
        # NOTE: to_host: a GPU run's values (the smoothed loss too) are device arrays
        values = np.asarray(backend_mod.to_host(value), dtype=np.float64).ravel()
        flat.update(zip(element_names(name, values.size), values.tolist()))
    return flat


class ResultsWriter:
    """Writes a run's results file, one flushed line per record (see the module docstring).

    Args:
        path: the file (its directory is created).
        rank: the MPI rank written into every record.
        append: add to an existing file (a resumed run) instead of starting a new one.
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0, append: bool = False) -> None:
        self.path = os.fspath(path)
        self.rank = int(rank)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a" if append else "w",  # noqa: SIM115
                                          encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"results file {self.path} is closed")
        # NOTE: one write + flush per record, so a reader (or a crash) sees whole lines only.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def write_train(self, iter: int, lr: float, seconds: float,
                    outputs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """One display iteration: the learning rate and the train net's outputs."""
        self._write({"kind": "train", "iter": int(iter), "lr": _number(float(lr)),
                     "seconds": _number(float(seconds)), "rank": self.rank,
                     "outputs": {k: _number(v) for k, v in flatten_outputs(outputs).items()}})

    def write_test(self, iter: int, seconds: float,
                   outputs: Mapping[str, Any] | Iterable[tuple[str, Any]],
                   test_net: int = 0) -> None:
        """One test pass: the mean of each output of test net ``test_net``."""
        self._write({"kind": "test", "iter": int(iter), "seconds": _number(float(seconds)),
                     "rank": self.rank, "test_net": int(test_net),
                     "outputs": {k: _number(v) for k, v in flatten_outputs(outputs).items()}})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _float(v: Any) -> float:
    if isinstance(v, str):
        return _NONFINITE[v]
    return math.nan if v is None else float(v)


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a results file, numbers as floats (``iter``, ``rank``, ``test_net`` ints).

    A last line cut short (a run killed while writing) is ignored; any other malformed line is a
    :class:`~pycaffe_mpi.errors.DataError` naming the file and line.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind = rec["kind"]
            if kind not in KINDS:
                raise ValueError(f'"kind" is {kind!r}, not one of {KINDS}')
            out = {"kind": kind, "iter": int(rec["iter"]), "rank": int(rec.get("rank", 0)),
                   "seconds": _float(rec.get("seconds")), "lr": _float(rec.get("lr")),
                   "test_net": int(rec.get("test_net", 0)),
                   "outputs": {str(k): _float(v) for k, v in rec["outputs"].items()}}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if n == len(lines):
                break  # no newline after it: a line the writer never finished
            raise errors.DataError(f"{path}:{n}: not a results record ({e})") from None
        records.append(out)
    return records


def looks_like_results(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a results file (its first non-blank character is "{")."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{")
