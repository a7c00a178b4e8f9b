"""pycaffe's ``caffe.io``: blob and datum conversion (image preprocessing follows).

The file formats themselves (``.caffemodel``, ``.solverstate``, ``.binaryproto``) are read and
written by :mod:`pycaffe_mpi.snapshot`; this module gives pycaffe scripts their familiar names.
"""

from __future__ import annotations

from pycaffe_mpi.snapshot import (
    array_to_blobproto,
    array_to_datum,
    arraylist_to_blobprotovector_str,
    blobproto_to_array,
    blobprotovector_str_to_arraylist,
    datum_to_array,
)

__all__ = ["array_to_blobproto", "array_to_datum", "arraylist_to_blobprotovector_str",
           "blobproto_to_array", "blobprotovector_str_to_arraylist", "datum_to_array"]
