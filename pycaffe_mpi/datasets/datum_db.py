"""LMDB and LevelDB databases of Caffe ``Datum`` records, and the per-pixel image mean over one.

Caffe's way of feeding data: each set becomes an LMDB (or LevelDB) of ``Datum`` records (C×H×W
uint8 ``data`` + ``label``, or encoded image files) read by a ``Data`` layer, with a per-pixel
mean in a ``.binaryproto`` (``tools/compute_image_mean.py``). The backends themselves are in
:mod:`pycaffe_mpi.datasets.db`. :func:`ensure_lmdb` and :func:`ensure_mean` are the
build-or-verify steps the dataset modules share: what exists is checked, not rewritten.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.datasets import db as dbm
from pycaffe_mpi.datasets import images as imgs
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
MEAN_FILE = "mean.binaryproto"


def write_datum_db(db_path: PathLike, images: np.ndarray, labels: np.ndarray,
                   key_format: str = "%05d", overwrite: bool = False,
                   backend: str = "lmdb") -> None:
    """Write ``images`` (N×C×H×W uint8) and ``labels`` (N,) as a database of ``Datum`` records.

    Keys are ``key_format % i`` (Caffe: ``%05d`` for CIFAR-10, ``%08d`` for MNIST), so key order
    is record order. ``backend`` is ``"lmdb"`` or ``"leveldb"``. The database is built under a
    temporary name beside ``db_path`` and renamed into place, so an interrupted run never
    leaves a half-written database.

    Raises:
        errors.DataError: ``db_path`` exists (and not ``overwrite``) or the shapes disagree.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise errors.DataError(f"images must be N x C x H x W uint8, got {images.shape} "
                               f"{images.dtype}")
    if labels.shape != images.shape[:1]:
        raise errors.DataError(f"{len(images)} images but labels of shape {labels.shape}")
    _, c, h, w = images.shape
    datum = caffe_pb2.Datum(channels=c, height=h, width=w)
    with dbm.DatumWriter(db_path, backend, overwrite=overwrite) as writer:
        for i in range(len(images)):
            datum.data = images[i].tobytes()
            datum.label = int(labels[i])
            writer.put((key_format % i).encode(), datum.SerializeToString())


def write_datum_lmdb(db_path: PathLike, images: np.ndarray, labels: np.ndarray,
                     key_format: str = "%05d", overwrite: bool = False) -> None:
    """:func:`write_datum_db` with the LMDB backend."""
    write_datum_db(db_path, images, labels, key_format, overwrite, "lmdb")


def db_entries(db_path: PathLike, backend: str | int | None = None) -> int:
    """Number of records in an LMDB or LevelDB (``backend`` None: detected)."""
    db = dbm.SharedDB.acquire(os.fspath(db_path), backend)
    try:
        return dbm.entries(db)
    finally:
        dbm.SharedDB.release(db)


def lmdb_entries(db_path: PathLike) -> int:
    """Number of records in an LMDB directory (opened through :func:`snapshot.open_lmdb`, so a
    truncated database is a DataError)."""
    return db_entries(db_path, "lmdb")


def iter_datums(db_path: PathLike, backend: str | int | None = None
                ) -> Iterator[tuple[bytes, Any]]:
    """Yield ``(key, Datum)`` for every record of an LMDB or LevelDB, in key order.

    ``backend`` None detects it from the files (data.mdb: LMDB; CURRENT: LevelDB). An LMDB is
    opened through :func:`pycaffe_mpi.snapshot.open_lmdb`, so a truncated one is a DataError
    before any page is read (never a SIGBUS); a garbled record is a DataError naming its key.
    """
    for key, value in dbm.iter_records(db_path, backend):
        try:
            yield key, caffe_pb2.Datum.FromString(value)
        except DecodeError as e:
            raise errors.DataError(f"{os.fspath(db_path)}: record {key!r} is not a valid "
                                   f"Datum: {e}") from None


def first_datum(db_path: PathLike, backend: str | int | None = None) -> Any:
    """The first record (in key order) of a Datum database."""
    it = iter_datums(db_path, backend)
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


def compute_image_mean(db_path: PathLike, backend: str | int | None = None) -> np.ndarray:
    """Per-pixel mean over the Datum records of an LMDB or LevelDB, as Caffe's
    ``compute_image_mean`` (``backend`` None: detected from the files).

    Encoded records (``convert_imageset --encoded``) are decoded as stored (gray files one
    channel, others BGR), as Caffe's ``DecodeDatumNative``.

    Returns:
        float32 array of shape (1, C, H, W): the sum over records divided by the count (Caffe
        sums uint8 ``data`` or ``float_data`` per pixel and divides in float).

    Raises:
        errors.DataError: the database is missing, damaged or empty, or its records differ
            in size.
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

    for key, d in iter_datums(db_path, backend):
        raw = d.data
        if d.encoded:
            arr = imgs.decode_datum(d)
            dshape, raw = arr.shape, arr.tobytes()
        else:
            dshape = (d.channels, d.height, d.width)
        if not shape:
            shape = dshape
        elif dshape != shape:
            raise errors.DataError(f"{db_path}: record {key!r} has shape {dshape}, the first "
                                   f"has {shape}")
        count += 1
        if len(raw):
            pending.append(raw)
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


def write_image_mean(db_path: PathLike, mean_path: PathLike,
                     backend: str | int | None = None) -> np.ndarray:
    """Compute the mean of ``db_path`` and write it as a legacy 1×C×H×W ``BlobProto``."""
    mean = compute_image_mean(db_path, backend)
    pio.write_binaryproto(mean_path, mean, legacy=True)
    return mean


def _verify_lmdb(db_path: Path, count: int, shape: tuple[int, ...]) -> None:
    n = db_entries(db_path)
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

