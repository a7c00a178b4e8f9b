"""LMDB databases of Caffe ``Datum`` records, and the per-pixel image mean over one.

Caffe's way of feeding data: each set becomes an LMDB of ``Datum`` records (C×H×W uint8 ``data``
+ ``label``) read by a ``Data`` layer, with a per-pixel mean in a ``.binaryproto``
(``tools/compute_image_mean.py``). :func:`ensure_lmdb` and :func:`ensure_mean` are the
build-or-verify steps the dataset modules share: what exists is checked, not rewritten.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
MEAN_FILE = "mean.binaryproto"


def _lmdb() -> Any:
    try:
        import lmdb
    except ImportError:
        raise errors.DataError("LMDB support needs the lmdb package: pip install lmdb") from None
    return lmdb



def write_datum_lmdb(db_path: PathLike, images: np.ndarray, labels: np.ndarray,
                     key_format: str = "%05d", overwrite: bool = False) -> None:
    """Write ``images`` (N×C×H×W uint8) and ``labels`` (N,) as an LMDB of ``Datum`` records.

    Keys are ``key_format % i`` (Caffe: ``%05d`` for CIFAR-10, ``%08d`` for MNIST), so key order
    is record order. The database is built in a temporary directory beside ``db_path`` and
    renamed into place, so an interrupted run never leaves a half-written database.

    Raises:
        errors.DataError: ``db_path`` exists (and not ``overwrite``) or the shapes disagree.
    """
    lmdb = _lmdb()
    db_path = Path(db_path)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise errors.DataError(f"images must be N x C x H x W uint8, got {images.shape} "
                               f"{images.dtype}")
    if labels.shape != images.shape[:1]:
        raise errors.DataError(f"{len(images)} images but labels of shape {labels.shape}")
    if db_path.exists():
        if not overwrite:
            raise errors.DataError(f"{db_path} already exists; delete it to rebuild it")
        shutil.rmtree(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.parent / f".{db_path.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()  # NOTE: not mkdtemp, whose 0700 would outlive the rename
    n, c, h, w = images.shape
    page = 4096
    # NOTE: records over ~2 KiB go to overflow pages; budget whole pages per record, twice over.
    per_record = (c * h * w + 64 + page - 1) // page * page + 64
    map_size = 2 * n * per_record + (64 << 20)
    try:
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True, meminit=False)
        try:
            datum = caffe_pb2.Datum(channels=c, height=h, width=w)
            chunk = 1000  # Caffe commits every 1,000 records
            for start in range(0, n, chunk):
                items = []
                for i in range(start, min(start + chunk, n)):
                    datum.data = images[i].tobytes()
                    datum.label = int(labels[i])
                    items.append(((key_format % i).encode(), datum.SerializeToString()))
                with env.begin(write=True) as txn:
                    txn.cursor().putmulti(items)
            env.sync(True)
        finally:
            env.close()
        os.replace(tmp, db_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lmdb_entries(db_path: PathLike) -> int:
    """Number of records in an LMDB directory."""
    lmdb = _lmdb()
    _check_lmdb_dir(db_path)
    env = lmdb.open(str(db_path), readonly=True, lock=False)
    try:
        return int(env.stat()["entries"])
    finally:
        env.close()


def _check_lmdb_dir(db_path: PathLike) -> None:
    if not (Path(db_path) / "data.mdb").is_file():
        raise errors.DataError(f"{db_path} is not an LMDB directory (no data.mdb)")


def iter_datums(db_path: PathLike) -> Iterator[tuple[bytes, Any]]:
    """Yield ``(key, Datum)`` for every record of an LMDB, in key order."""
    lmdb = _lmdb()
    _check_lmdb_dir(db_path)
    env = lmdb.open(str(db_path), readonly=True, lock=False)
    try:
        with env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                yield key, caffe_pb2.Datum.FromString(value)
    finally:
        env.close()


def first_datum(db_path: PathLike) -> Any:
    """The first record (in key order) of a Datum LMDB."""
    it = iter_datums(db_path)
    try:
        return next(it)[1]
    except StopIteration:
        raise errors.DataError(f"{db_path} holds no records") from None
    finally:
        it.close()


def read_datum_lmdb(db_path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All records of a uint8 Datum LMDB as ``(images N×C×H×W uint8, labels (N,) int64)``."""
    data, labels, shape = [], [], None
    for _, d in iter_datums(db_path):
        shape = shape or (d.channels, d.height, d.width)
        data.append(d.data)
        labels.append(d.label)
    if shape is None:
        raise errors.DataError(f"{db_path} holds no records")
    images = np.frombuffer(b"".join(data), dtype=np.uint8).reshape(-1, *shape)
    return images, np.asarray(labels, dtype=np.int64)


def compute_image_mean(db_path: PathLike) -> np.ndarray:
    """Per-pixel mean over the Datum records of an LMDB, as Caffe's ``compute_image_mean``.

    Returns:
        float32 array of shape (1, C, H, W): the sum over records divided by the count (Caffe
        sums uint8 ``data`` or ``float_data`` per pixel and divides in float).

    Raises:
        errors.DataError: the database is empty or its records differ in size.
    """
    total: np.ndarray | None = None
    shape: tuple[int, ...] = ()
    count = 0
    pending: list[bytes] = []

    def flush() -> None:
        nonlocal total
        if pending:
            block = np.frombuffer(b"".join(pending), dtype=np.uint8).reshape(len(pending), -1)
            s = block.sum(axis=0, dtype=np.float64)
            total = s if total is None else total + s
            pending.clear()

    for key, d in iter_datums(db_path):
        if not shape:
            shape = (d.channels, d.height, d.width)
        elif (d.channels, d.height, d.width) != shape:
            raise errors.DataError(f"{db_path}: record {key!r} has shape "
                                   f"{(d.channels, d.height, d.width)}, the first has {shape}")
        if d.encoded:
            raise errors.DataError(f"{db_path}: encoded Datum records are not supported here")
        count += 1
        if len(d.data):
            pending.append(d.data)
            if len(pending) >= 4096:
                flush()
        else:
            vals = np.fromiter(d.float_data, dtype=np.float64, count=len(d.float_data))
            total = vals if total is None else total + vals
    flush()
    if not count or total is None:
        raise errors.DataError(f"{db_path} holds no records to average")
    # NOTE: Caffe sums in float32 and divides by the count in float32; uint8 sums of up to
    # 65,793 records are exact in float32, so float64 sums cast down give the same bits.
    mean = total.astype(np.float32) / np.float32(count)
    log.info("mean of %d records of %s: per channel %s", count, db_path,
             np.round(mean.reshape(shape[0], -1).mean(axis=1), 3).tolist())
    return mean.reshape(1, *shape)


def write_image_mean(db_path: PathLike, mean_path: PathLike) -> np.ndarray:
    """Compute the mean of ``db_path`` and write it as a legacy 1×C×H×W ``BlobProto``."""
    mean = compute_image_mean(db_path)
    pio.write_binaryproto(mean_path, mean, legacy=True)
    return mean




def _verify_lmdb(db_path: Path, count: int, shape: tuple[int, ...]) -> None:
    n = lmdb_entries(db_path)
    if n != count:
        raise errors.DataError(f"{db_path} holds {n} records, expected {count}; delete it and "
                               "run again to rebuild it")
    first = first_datum(db_path)
    got = (first.channels, first.height, first.width)
    if got != shape:
        raise errors.DataError(f"{db_path} holds {got} records, expected {shape}; delete it and "
                               "run again to rebuild it")


def ensure_lmdb(db_path: Path, count: int, shape: tuple[int, ...],
                 build: Callable[[], None]) -> None:
    if db_path.exists():
        _verify_lmdb(db_path, count, shape)
        log.info("%s exists (%d records), skipping", db_path, count)
        return
    build()
    _verify_lmdb(db_path, count, shape)
    log.info("wrote %s (%d records)", db_path, count)


def ensure_mean(mean_path: Path, db_path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if mean_path.exists():
        mean = pio.read_binaryproto(mean_path)
        if mean.shape != (1, *shape):
            raise errors.DataError(f"{mean_path} has shape {mean.shape}, expected "
                                   f"{(1, *shape)}; delete it and run again")
        log.info("%s exists, skipping", mean_path)
        return mean
    mean = write_image_mean(db_path, mean_path)
    log.info("wrote %s", mean_path)
    return mean

