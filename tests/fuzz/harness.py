"""What the fuzz tests run: the shipped nets and solvers made runnable on tiny data, and the
checks that a (mutated) file ends in the project's own error with a location.

The seeds are the real files under ``models/`` and ``solvers/``; only their data paths, batch
sizes and run lengths are changed (``localise_*``), so a mutation starts from what users run.

Each example runs under a wall-clock limit (SIGALRM) and an address-space cap (RLIMIT_AS), so
a hang or a huge allocation fails the example instead of stalling or swapping the machine.
"""

from __future__ import annotations

import contextlib
import io
import re
import resource
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi import datasets, errors
from pycaffe_mpi import snapshot as snapshot_io

ROOT = Path(__file__).resolve().parents[2]
BATCH = 2
# room above what the process already maps: a net of the shipped models at batch 2 needs a few
# MiB; a shape check that fires late would ask for gigabytes
HEADROOM_BYTES = 1 << 30
TIME_LIMIT_S = 20


def seed_nets() -> list[Path]:
    """Every net prototxt shipped under models/ (deploy nets included)."""
    return sorted(p for p in (ROOT / "models").rglob("*.prototxt") if "solver" not in p.name)


def seed_solvers() -> list[Path]:
    """Every solver prototxt shipped under solvers/ and models/."""
    return sorted([*(ROOT / "solvers").glob("*.prototxt"),
                   *(p for p in (ROOT / "models").rglob("*.prototxt") if "solver" in p.name)])


def make_data(d: Path) -> Path:
    """A 3×32×32 Datum LMDB of 8 records and a mean file: enough for every shipped net."""
    rng = np.random.default_rng(0)
    datasets.write_datum_lmdb(d / "db", rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8),
                              rng.integers(0, 10, 8))
    snapshot_io.write_binaryproto(d / "mean.binaryproto", np.full((1, 3, 32, 32), 120.0),
                                  legacy=True)
    return d


def localise_net(text: str, data: Path) -> str:
    """A shipped net reading the tiny data with batch size BATCH."""
    text = re.sub(r'\bsource:\s*"[^"]*"', f'source: "{data / "db"}"', text)
    text = re.sub(r'\bmean_file:\s*"[^"]*"', f'mean_file: "{data / "mean.binaryproto"}"', text)
    text = re.sub(r"\bbatch_size:\s*\d+", f"batch_size: {BATCH}", text)
    # deploy nets: the batch axis of their input shape
    return re.sub(r"(\bdim:\s*)\d+(\s+dim:\s*3\s+dim:\s*32)", rf"\g<1>{BATCH}\2", text)


def as_v1(text: str) -> str:
    """A current-format net written in Caffe's V1 format (``layers`` blocks, enum types,
    ``blobs_lr``), so the fuzz reaches the upgrade path from a shipped net."""
    from pycaffe_mpi import upgrade
    from pycaffe_mpi.proto import caffe_pb2

    enum = caffe_pb2.V1LayerParameter.LayerType
    names = {v: enum.Name(k) for k, v in upgrade.V1_TYPES.items() if v}
    text = re.sub(r"\blayer(\s*)\{", r"layers\1{", text)
    text = re.sub(r'\btype:\s*"(\w+)"', lambda m: f"type: {names[m.group(1)]}"
                  if m.group(1) in names else m.group(0), text)
    return re.sub(r"\bparam\s*\{\s*lr_mult:\s*([\d.]+)\s*\}", r"blobs_lr: \1", text)


_RUN_LENGTH = {"max_iter": 1, "test_iter": 1, "test_interval": 1, "display": 1, "snapshot": 0}


def localise_solver(text: str, net: Path, workdir: Path) -> str:
    """A shipped solver training ``net`` for one iteration, snapshots under ``workdir``."""
    text = re.sub(r'\b(train_|test_)?net:\s*"[^"]*"', lambda m: f'{m.group(1) or ""}net: '
                  f'"{net}"', text)
    text = re.sub(r'\bsnapshot_prefix:\s*"[^"]*"', f'snapshot_prefix: "{workdir / "snap"}"',
                  text)
    for field, value in _RUN_LENGTH.items():
        text = re.sub(rf"\b{field}:\s*\d+", f"{field}: {value}", text)
    return text


# -- limits ------------------------------------------------------------------------------------
class TimeLimit(BaseException):
    """Raised in the main thread when an example runs past its limit (a BaseException, so no
    ``except Exception`` in the code under test swallows it)."""


@contextlib.contextmanager
def limits(seconds: int = TIME_LIMIT_S, headroom: int = HEADROOM_BYTES) -> Iterator[None]:
    """Run the body with a wall-clock limit and an address-space cap; both lifted after."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeLimit(f"example ran past {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _mapped_bytes() + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


# -- checks ------------------------------------------------------------------------------------
def check_error(e: BaseException, path: Path) -> None:
    """``e`` must be one of our errors and name ``path`` (a file, or the directory of the files
    involved). A blob that cannot be allocated under the memory cap is one of ours
    (BlobAllocationError, naming layer, shape and bytes); a bare MemoryError is not."""
    if isinstance(e, TimeLimit) or not isinstance(e, errors.PycaffeError):
        raise AssertionError(f"{type(e).__name__} instead of a PycaffeError: {e}") from e
    msg = str(e)
    assert str(path) in msg or path.name in msg, \
        f"error without a location: {type(e).__name__}: {msg}"


class _Any:
    """What another rank reports in a build-only world: equal to whatever it is checked
    against."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "?"


class FakeWorld(comm_mod.SelfComm):
    """Rank ``rank`` of a ``size``-process world, for building (not running) MPI nets in one
    process. Object collectives answer for the other ranks as if they agreed: flags and strings
    as this rank's, counts as :class:`_Any` (a root's counts differ from its members')."""

    def __init__(self, size: int = 3, rank: int = 0) -> None:
        self.rank, self.size = rank, size

    def _others(self, obj: Any) -> list[Any]:
        other = tuple(_Any() if isinstance(x, int) and not isinstance(x, bool) else x
                      for x in obj) if isinstance(obj, tuple) else obj
        return [obj if i == self.rank else other for i in range(self.size)]

    def allgather_obj(self, obj: Any) -> list[Any]:
        return self._others(obj)

    def allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        recvbuf[...] = sendbuf  # every member sent what this one did

    def gather(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        if recvbuf is not None:
            recvbuf[...] = sendbuf

    def gather_obj(self, obj: Any, root: int) -> list[Any] | None:
        return self._others(obj)

    def create_group(self, ranks: Sequence[int]) -> Any:
        ranks = list(ranks)
        return FakeWorld(len(ranks), ranks.index(self.rank)) if self.rank in ranks else None


def build_nets(path: Path) -> None:
    """Build the net in ``path`` for TRAIN and TEST, as rank 0 of 3 (the shipped MPI nets'
    size; nets without MPI layers ignore it)."""
    from pycaffe_mpi.net import Net

    for phase in (0, 1):
        net = None
        try:
            net = Net(str(path), phase, seed=1, comm=FakeWorld())
        finally:
            if net is not None:
                net.close()


def run_nets(path: Path) -> None:
    """Build the net in ``path`` for TRAIN and TEST and run one forward and backward pass of
    each (rank 0 of 3, as :func:`build_nets`)."""
    from pycaffe_mpi.net import Net

    for phase in (0, 1):
        net = Net(str(path), phase, seed=1, comm=FakeWorld())
        try:
            net.forward_backward()
        finally:
            net.close()


def expect_clean(fn: Any, path: Path, *args: Any) -> errors.PycaffeError | None:
    """Run ``fn(path, *args)`` under limits: it succeeds (None) or ends in a PycaffeError that
    names ``path`` (returned); anything else fails the test."""
    try:
        with limits():
            fn(path, *args)
    except (AssertionError, KeyboardInterrupt):
        raise
    except BaseException as e:
        check_error(e, path)
        return e  # type: ignore[return-value]
    return None


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``pycaffe-mpi ARGV`` in this process: (exit code, what it wrote to stderr)."""
    from pycaffe_mpi import cli

    err = io.StringIO()
    old = sys.stderr
    sys.stderr = err
    try:
        code = cli.main(argv)
    finally:
        sys.stderr = old
    return code, err.getvalue()
