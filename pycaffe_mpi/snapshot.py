"""Blob, Datum and binary-proto files: pycaffe's ``caffe.io`` names, plus safe file writing.

* ``blobproto_to_array`` / ``array_to_blobproto``: a ``BlobProto`` (``.binaryproto`` mean files,
  parameter blobs inside ``.caffemodel``) to and from a NumPy array, C order (N, C, H, W).
* ``array_to_datum`` / ``datum_to_array``: one LMDB record (``Datum``, C×H×W) to and from an array.
* ``read_binaryproto`` / ``write_binaryproto``: a whole ``.binaryproto`` file;
  ``arraylist_to_blobprotovector_str`` / ``blobprotovector_str_to_arraylist`` for several.
* ``read_proto_binary`` / ``write_proto_binary``: any binary protobuf message file (the writer is
  atomic, through :func:`atomic_write`, so a crash never leaves a half-written snapshot).

A missing or garbled file raises :class:`pycaffe_mpi.errors.DataError` naming the path.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
from google.protobuf import message as pb_message

from pycaffe_mpi import errors
from pycaffe_mpi.proto import caffe_pb2

# Field numbers of BlobProto's packed value fields (see proto/caffe.proto).
_DATA, _DIFF, _DOUBLE_DATA, _DOUBLE_DIFF = 5, 6, 8, 9


# -- files ------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The bytes go to a temporary file in the same directory, are flushed to disk (fsync), and the
    temporary file then replaces ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # NOTE: os.open with mode 0o666 honours the umask (mkstemp would make the file 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    import io as _io

    try:
        from PIL import Image
    except ImportError:
        raise errors.DataError("an encoded Datum needs Pillow: pip install pillow") from None
    img = Image.open(_io.BytesIO(raw))
    gray = channels == 1 or (channels == 0 and img.mode in ("L", "I;16", "I", "F"))
    arr = np.asarray(img.convert("L" if gray else "RGB"))
    if gray:
        return arr[None]
    return np.ascontiguousarray(arr[:, :, ::-1].transpose(2, 0, 1))  # HWC RGB -> CHW BGR
