"""Image files and encoded Datums, the way Caffe's OpenCV code sees them, through Pillow.

* :func:`decode_image`, :func:`encode_image`, :func:`resize_bilinear` (from
  :mod:`pycaffe_mpi.image_codec`): image bytes to C×H×W pixels and back.
* :func:`decode_datum`: a Datum's C×H×W array, decoding ``encoded`` ones (Caffe's
  ``DecodeDatumToCVMat`` / ``DecodeDatumToCVMatNative``).
* :func:`encode_image`, :func:`resize_bilinear`, :func:`read_image_file`: what
  ``convert_imageset`` needs (Caffe's ``ReadImageToCVMat`` / ``ReadImageToDatum``).
* :func:`convert_imageset`: Caffe's ``convert_imageset`` tool as a function.

Pixels match OpenCV's for PNG and other lossless files; gray conversion of colour pixels
uses OpenCV's weights (0.299 R + 0.587 G + 0.114 B, rounded) and JPEGs read as gray take
libjpeg's luma directly, as OpenCV does; a JPEG decoder of another version may differ by
a grey level. Resizing follows OpenCV's INTER_LINEAR geometry (pixel centres aligned, no
antialiasing), computed in floating point, so a value may differ from OpenCV's by one.
EXIF orientation is not applied (Caffe's OpenCV 2/3 ``imdecode`` did not either).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.datasets import db as dbm
from pycaffe_mpi.image_codec import decode_image, encode_image, resize_bilinear
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger(__name__)

def decode_datum(datum: Any, color: bool | None = None) -> np.ndarray:
    """The C×H×W array of a Datum; ``encoded`` ones decoded with :func:`decode_image`."""
    if datum.encoded:
        return decode_image(datum.data, color)
    return pio.datum_to_array(datum)


def read_image_file(path: str, is_color: bool = True, height: int = 0, width: int = 0
                    ) -> np.ndarray | None:
    """An image file as uint8 C×H×W (Caffe's ``ReadImageToCVMat``), resized when height and
    width are both > 0; None (with an error logged) when it cannot be read, as Caffe."""
    try:
        with open(path, "rb") as f:
            arr = decode_image(f.read(), is_color)
    except (OSError, errors.DataError) as e:
        log.error("Could not open or find file %s (%s)", path, e)
        return None
    if height > 0 and width > 0:
        arr = resize_bilinear(arr, height, width)
    return arr


def _match_ext(filename: str, encoding: str) -> bool:
    ext = filename.rsplit(".", 1)[-1].lower()
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def read_list_file(listfile: str) -> list[tuple[str, int]]:
    """Caffe's list file: one ``relative/path label`` per line (the label follows the last
    space, so names may hold spaces); blank lines are skipped."""
    lines = []
    try:
        with open(listfile, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                name, _, label = line.rpartition(" ")
                try:
                    lines.append((name, int(label)))
                except ValueError:
                    raise errors.DataError(f"{listfile}:{no}: expected 'path label', got "
                                           f"{line!r}") from None
    except OSError as e:
        raise errors.DataError(f"cannot read list file {listfile!r}: {e}") from None
    return lines


def convert_imageset(root_folder: str, listfile: str, db_path: str, *, gray: bool = False,
                     shuffle: bool = False, backend: str = "lmdb", resize_height: int = 0,
                     resize_width: int = 0, check_size: bool = False, encoded: bool = False,
                     encode_type: str = "", seed: int | None = None,
                     overwrite: bool = False) -> int:
    """Caffe's ``convert_imageset``: the images of a list file into a database of Datums.

    Each line ``name label`` of ``listfile`` becomes a record under the key
    ``%08d_<name>`` (its index after shuffling), holding the image ``root_folder + name``
    (a plain string join, as Caffe; a ``/`` is added when ``root_folder`` lacks one) as
    C×H×W uint8 BGR (1 channel with ``gray``), resized to resize_height × resize_width when
    both are set. With ``encoded`` (implied by ``encode_type``) the record holds image file
    bytes instead (``encoded: true``, no channels/height/width, as Caffe writes them): the
    file itself when its extension matches the encoding and nothing is resized, else the
    decoded image re-encoded (``encode_type``, or the file's own extension). Unreadable
    images are logged and skipped. ``check_size`` requires every image to have the first
    one's C×H×W. ``seed`` makes ``shuffle`` reproducible (Caffe's is random).

    Returns:
        the number of records written.

    Raises:
        errors.DataError: a bad list file, ``db_path`` exists (and not ``overwrite``), sizes
            differ under ``check_size``, or no extension to guess an encoding from.
    """
    if (resize_height > 0) != (resize_width > 0) or min(resize_height, resize_width) < 0:
        raise errors.DataError("resize_height and resize_width must be given together")
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
        encoded = True
    lines = read_list_file(listfile)
    if shuffle:
        log.info("Shuffling data")
        order = np.random.default_rng(seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    log.info("A total of %d images.", len(lines))
    if root_folder and not root_folder.endswith(("/", os.sep)):
        root_folder += "/"
    shape: tuple[int, ...] | None = None
    with dbm.DatumWriter(db_path, backend, overwrite=overwrite) as writer:
        for line_id, (name, label) in enumerate(lines):
            path = root_folder + name
            arr = read_image_file(path, not gray, resize_height, resize_width)
            if arr is None:
                continue
            if check_size:
                if shape is None:
                    shape = arr.shape
                elif arr.shape != shape:
                    raise errors.DataError(f"{path}: Incorrect data field size: image is "
                                           f"{arr.shape}, the first one {shape}")
            datum = caffe_pb2.Datum(label=label)
            if encoded:
                enc = encode_type or _guess_encoding(name)
                if not resize_height and _match_ext(name, enc):
                    with open(path, "rb") as f:
                        datum.data = f.read()
                else:
                    datum.data = encode_image(arr, enc)
                datum.encoded = True
            else:
                datum.channels, datum.height, datum.width = arr.shape
                datum.data = arr.tobytes()
            writer.put(f"{line_id:08d}_{name}".encode(), datum.SerializeToString())
            if writer.count % dbm.COMMIT_EVERY == 0:
                log.info("Processed %d files.", writer.count)
        count = writer.count
    if count % dbm.COMMIT_EVERY:
        log.info("Processed %d files.", count)
    return count


def _guess_encoding(name: str) -> str:
    base = os.path.basename(name)
    if "." not in base:
        raise errors.DataError(f"Failed to guess the encoding of {name!r} (no extension); "
                               "give --encode_type")
    return base.rsplit(".", 1)[-1].lower()
