"""Blob, Datum and binary-proto files: pycaffe's ``caffe.io`` names, plus safe file writing.

* ``blobproto_to_array`` / ``array_to_blobproto``: a ``BlobProto`` (``.binaryproto`` mean files,
  parameter blobs inside ``.caffemodel``) to and from a NumPy array, C order (N, C, H, W).
* ``array_to_datum`` / ``datum_to_array``: one LMDB record (``Datum``, C×H×W) to and from an array.
* ``read_binaryproto`` / ``write_binaryproto``: a whole ``.binaryproto`` file;
  ``arraylist_to_blobprotovector_str`` / ``blobprotovector_str_to_arraylist`` for several.
* ``read_proto_binary`` / ``write_proto_binary``: any binary protobuf message file (the writer is
  atomic, through :func:`atomic_write`, so a crash never leaves a half-written snapshot, a full
  disk leaves the previous file intact, and a killed writer's temporary file is removed by the
  next write of the same path).
* ``open_lmdb`` / ``check_lmdb``: a read-only LMDB of Datum records, checked for damage.

A missing or garbled file raises :class:`pycaffe_mpi.errors.DataError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from google.protobuf import message as pb_message

from pycaffe_mpi import errors, image_codec
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger(__name__)

# Field numbers of BlobProto's packed value fields (see proto/caffe.proto).
_DATA, _DIFF, _DOUBLE_DATA, _DOUBLE_DIFF = 5, 6, 8, 9


# -- files ------------------------------------------------------------------------------------
class WriteError(errors.SnapshotError, OSError):
    """A file (snapshot, mean, report) could not be written, e.g. the disk is full.

    Both a :class:`~pycaffe_mpi.errors.PycaffeError` (the CLI prints one clear line) and an
    ``OSError`` (``errno`` and ``filename`` are kept, so ``except OSError`` still catches it).
    """

    def __str__(self) -> str:
        # NOTE: OSError's own __str__ would show "[Errno n] strerror: filename" instead.
        return str(self.args[0]) if self.args else ""


STALE_AGE_S = 3600.0
"""A temporary file older than this is stale whoever wrote it (a writer on another host, or a
dead process whose id was reused)."""
_LEGACY_STALE_AGE_S = 600.0  # temporary names without a writer tag (older versions)
_TAG_RE = re.compile(r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-)?[0-9a-f]{12}\.tmp")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(path: str | os.PathLike) -> str:
    """A fresh temporary name beside ``path``: ``.<name>.<host>-<pid>-<random>.tmp``.

    The host and process tags let :func:`remove_stale_temps` tell a killed writer's leftovers
    from a live writer's file.
    """
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    tag = f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}"
    return os.path.join(directory, f".{base}.{tag}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (someone else's) or cannot tell: keep its file
    return True


def _is_stale(name: str, full: str, now: float) -> bool:
    try:
        age = now - os.stat(full).st_mtime
    except OSError:
        return False  # already gone
    match = _TAG_RE.fullmatch(name)
    if match is None:
        return False
    if match["pid"] is None:
        return age > _LEGACY_STALE_AGE_S
    pid = int(match["pid"])
    if match["host"] == _host_tag() and pid != os.getpid() and not _pid_alive(pid):
        return True
    return age > STALE_AGE_S


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed writers left beside ``path``; return their paths.

    Only names of :func:`temp_path`'s pattern for this very ``path`` are considered, and only
    stale ones are removed: written on this host by a process that no longer runs, or older
    than :data:`STALE_AGE_S` (untagged names of older versions: 10 minutes).
    """
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    prefix, now, removed = f".{base}.", time.time(), []
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        full = os.path.join(directory, name)
        if _is_stale(name[len(prefix):], full, now):
            try:
                os.unlink(full)
            except OSError:
                continue  # another process cleaned it first, or we may not: not our problem
            removed.append(full)
            log.info("removed %s, a temporary file left by an interrupted write", full)
    return removed


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, size: str = "") -> Iterator[str]:
    """A temporary path to write in full; it replaces ``path`` when the block ends cleanly.

    Stale temporary files of killed writers of ``path`` are removed first; the block's file
    is flushed to disk (fsync) and then renamed onto ``path`` (``os.replace`` is atomic on
    POSIX and Windows). On any error the temporary file is removed and ``path`` is untouched;
    an ``OSError`` (e.g. no space left on device) becomes a :class:`WriteError` (``size`` is
    added to its message).
    """
    path = os.fspath(path)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise write_error(path, e, size) from e


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one
    (through :func:`atomic_target`).

    Raises:
        WriteError: the write failed (e.g. no space left on device); the previous ``path``, if
            any, is unchanged and no temporary file is left behind.
    """
    with atomic_target(path, f" ({len(data)} bytes)") as tmp:
        # NOTE: os.open with mode 0o666 honours the umask (mkstemp would make the file 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def write_error(path: str, e: OSError, size: str = "") -> WriteError:
    """The :class:`WriteError` for an ``OSError`` ``e`` that stopped an atomic write of
    ``path``: it says whether the previous file survived and, for a full disk, what to do."""
    kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
    # NOTE: h5py reports a full disk in its message only, without errno
    full = (e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            or "No space left" in str(e))
    hint = "; free some space and retry" if full else ""
    err = WriteError(f"cannot write {path!r}{size}: {e.strerror or e}; {kept}{hint}")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, path
    return err


def _read_bytes(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise errors.DataError(f"{what} file {os.fspath(path)!r} does not exist") from None
    except OSError as e:
        raise errors.DataError(f"cannot read {what} file {os.fspath(path)!r}: {e}") from e


def read_proto_binary(path: str | os.PathLike, message: Any) -> Any:
    """Parse the binary protobuf file ``path`` into ``message`` (cleared first) and return it.

    Raises:
        errors.DataError: the file is missing, unreadable or not a valid ``message``.
    """
    what = type(message).__name__
    raw = _read_bytes(path, what)
    try:
        message.ParseFromString(raw)
    except pb_message.DecodeError as e:
        raise errors.DataError(
            f"{os.fspath(path)!r} is not a valid binary {what} ({len(raw)} bytes): {e}") from e
    return message


def write_proto_binary(path: str | os.PathLike, message: Any) -> None:
    """Serialise ``message`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, message.SerializeToString())


# -- BlobProto ----------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _packed(field: int, raw: bytes) -> bytes:
    """The wire encoding of a packed repeated field holding ``raw`` (little-endian values)."""
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _blob_shape(blob: Any) -> tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    # NOTE: legacy blobs (mean files written by Caffe's compute_image_mean) are always 4-D:
    # num, channels, height, width, as Caffe's Blob::FromProto reads them.
    return (blob.num, blob.channels, blob.height, blob.width)


def blobproto_to_array(blob: Any, return_diff: bool = False) -> np.ndarray:
    """The values (or, with ``return_diff``, the gradients) of a ``BlobProto`` as an array.

    The shape comes from ``shape`` when present, else from the legacy num/channels/height/width.
    Values come from ``double_data`` (float64) when it is not empty, else from ``data``
    (float32), as Caffe's ``Blob::FromProto`` chooses.

    Raises:
        errors.DataError: the number of values does not match the shape.
    """
    shape = _blob_shape(blob)
    single, double = (blob.diff, blob.double_diff) if return_diff else (blob.data, blob.double_data)
    # NOTE: np.fromiter is several times faster than np.array on protobuf repeated fields.
    if len(double):
        arr = np.fromiter(double, dtype=np.float64, count=len(double))
    else:
        arr = np.fromiter(single, dtype=np.float32, count=len(single))
    count = int(np.prod(shape, dtype=np.int64))
    if arr.size != count:
        field = "diff" if return_diff else "data"
        raise errors.DataError(
            f"BlobProto of shape {shape} holds {arr.size} {field} values, expected {count}")
    return arr.reshape(shape)


def array_to_blobproto(arr: Any, diff: Any = None, legacy: bool = False,
                       double: bool = False) -> Any:
    """A ``BlobProto`` holding ``arr`` (as float32 ``data``) and optionally ``diff``.

    Args:
        arr: values, any shape.
        diff: gradients of the same shape, or None.
        legacy: write the 4-D legacy num/channels/height/width instead of ``shape`` (as Caffe's
            compute_image_mean does for mean files); ``arr`` must have at most 4 axes, padded on
            the left with 1s.
        double: write ``double_data``/``double_diff`` (float64) instead, as Caffe's
            ``Blob<double>`` does.
    """
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    if legacy:
        if arr.ndim > 4:
            raise errors.DataError(f"a legacy BlobProto has at most 4 axes, got shape {arr.shape}")
        num, channels, height, width = (1,) * (4 - arr.ndim) + arr.shape
        blob.num, blob.channels, blob.height, blob.width = num, channels, height, width
    else:
        blob.shape.dim.extend(arr.shape)
    # NOTE: appending the packed wire bytes is ~100x faster than data.extend() on large blobs,
    # and parses to the very same message.
    fmt, data_field, diff_field = ("<f8", _DOUBLE_DATA, _DOUBLE_DIFF) if double else \
        ("<f4", _DATA, _DIFF)
    raw = _packed(data_field, np.ascontiguousarray(arr, dtype=fmt).tobytes())
    if diff is not None:
        diff = np.asarray(diff)
        if diff.shape != arr.shape:
            raise errors.DataError(f"diff shape {diff.shape} differs from data shape {arr.shape}")
        raw += _packed(diff_field, np.ascontiguousarray(diff, dtype=fmt).tobytes())
    blob.MergeFromString(raw)
    return blob


def read_binaryproto(path: str | os.PathLike) -> np.ndarray:
    """The array stored in a ``.binaryproto`` file (a serialised ``BlobProto``, e.g. a mean)."""
    blob = read_proto_binary(path, caffe_pb2.BlobProto())
    try:
        return blobproto_to_array(blob)
    except errors.DataError as e:
        raise errors.DataError(f"{os.fspath(path)!r}: {e}") from None


def write_binaryproto(path: str | os.PathLike, arr: Any, legacy: bool = False) -> None:
    """Write ``arr`` as a ``BlobProto`` file (atomically); ``legacy`` as in array_to_blobproto."""
    write_proto_binary(path, array_to_blobproto(arr, legacy=legacy))


def arraylist_to_blobprotovector_str(arraylist: list[Any]) -> bytes:
    """Serialise a list of arrays as a ``BlobProtoVector`` (pycaffe's name)."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(raw: bytes) -> list[np.ndarray]:
    """The arrays of a serialised ``BlobProtoVector`` (pycaffe's name)."""
    vec = caffe_pb2.BlobProtoVector()
    try:
        vec.ParseFromString(raw)
    except pb_message.DecodeError as e:
        raise errors.DataError(f"not a valid BlobProtoVector: {e}") from e
    return [blobproto_to_array(b) for b in vec.blobs]


# -- Datum ------------------------------------------------------------------------------------
def array_to_datum(arr: Any, label: int | None = None) -> Any:
    """A ``Datum`` from a C×H×W array: uint8 goes to ``data`` bytes, anything else to float_data.

    Raises:
        errors.DataError: ``arr`` does not have 3 axes.
    """
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise errors.DataError(f"a Datum holds a C x H x W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float64).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum: Any) -> np.ndarray:
    """The C×H×W array of a ``Datum``: uint8 from ``data`` or float32 from ``float_data``.

    An ``encoded`` Datum (a compressed image file, as ``convert_imageset --encoded`` writes) is
    decoded with Pillow and returned in Caffe's (OpenCV's) BGR channel order.
    """
    if datum.encoded:
        return _decode_image(datum.data, datum.channels)
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        arr = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        arr = np.fromiter(datum.float_data, dtype=np.float32, count=len(datum.float_data))
    if arr.size != int(np.prod(shape)):
        raise errors.DataError(f"Datum of shape {shape} holds {arr.size} values")
    return arr.reshape(shape)


def _decode_image(raw: bytes, channels: int) -> np.ndarray:
    return image_codec.decode_image(raw, True if channels == 3 else False if channels == 1
                                    else None)


# -- LMDB -------------------------------------------------------------------------------------
def open_lmdb(path: str | os.PathLike) -> Any:
    """Open the LMDB directory ``path`` read-only, after checking it is whole.

    Returns:
        the ``lmdb.Environment``.

    Raises:
        errors.DataError: naming ``path``: the lmdb package is missing, the meta pages are
            damaged (not an LMDB), or the data file is shorter than its last used page says
            (see :func:`check_lmdb`).
    """
    try:
        import lmdb  # imported late so `import pycaffe_mpi` stays light
    except ImportError:
        raise errors.DataError("LMDB support needs the lmdb package: pip install lmdb") from None
    path = os.fspath(path)
    try:
        # NOTE: lock=False: the data are read-only and many ranks may read at once.
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=1024)
    except lmdb.Error as e:
        raise errors.DataError(f"LMDB {path!r} cannot be opened: it is damaged or not an LMDB "
                               f"({e}); rebuild or copy it again") from None
    try:
        check_lmdb(env, path)
    except BaseException:
        env.close()
        raise
    return env


def lmdb_bytes_needed(env: Any) -> int:
    """The size the data file must have at least: (last used page + 1) × page size."""
    return (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])


def check_lmdb(env: Any, path: str | os.PathLike, needed: int | None = None) -> None:
    """Raise a DataError naming ``path`` if its data file is shorter than ``needed`` bytes
    (default: :func:`lmdb_bytes_needed`).

    NOTE: LMDB maps the file into memory; reading a page past the end of a truncated file is a
    SIGBUS that kills the process, so the size is checked before pages are touched (at open,
    and by readers before each batch, in case the file shrinks while we read it).
    """
    path = os.fspath(path)
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    if needed is None:
        needed = lmdb_bytes_needed(env)
    try:
        size = os.stat(data_file).st_size
    except OSError as e:
        raise errors.DataError(f"LMDB {path!r}: cannot read {data_file!r}: {e}") from None
    if size < needed:
        raise errors.DataError(
            f"LMDB {path!r} is truncated: {data_file!r} holds {size} bytes but its last used "
            f"page ends at byte {needed} (an interrupted copy or a full disk?); copy or "
            "rebuild the database")
