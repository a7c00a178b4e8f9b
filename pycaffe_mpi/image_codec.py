"""Image bytes to pixels and back, the way Caffe's OpenCV code sees them, through Pillow.

* :func:`decode_image`: JPEG/PNG/... bytes to uint8 C×H×W, BGR (OpenCV's order) or 1 gray
  channel: ``color`` True = ``IMREAD_COLOR``, False = ``IMREAD_GRAYSCALE``, None =
  ``IMREAD_ANYCOLOR`` (gray files stay 1 channel, the rest become 3).
* :func:`encode_image`, :func:`resize_bilinear`: what writing image Datums needs.

Pixels match OpenCV's for PNG and other lossless files; gray conversion of colour pixels
uses OpenCV's weights (0.299 R + 0.587 G + 0.114 B, rounded) and JPEGs read as gray take
libjpeg's luma directly, as OpenCV does; a JPEG decoder of another version may differ by
a grey level. Resizing follows OpenCV's INTER_LINEAR geometry (pixel centres aligned, no
antialiasing), computed in floating point, so a value may differ from OpenCV's by one.
EXIF orientation is not applied (Caffe's OpenCV 2/3 ``imdecode`` did not either).

It depends on nothing of the project but its errors, so the file formats
(:mod:`pycaffe_mpi.snapshot`) and the datasets tools can both use it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pycaffe_mpi import errors

_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")
JPEG_QUALITY = 95  # OpenCV's imencode default


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise errors.DataError("images need Pillow: pip install pillow") from None
    return Image


def _to_gray(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's RGB -> gray in 14-bit fixed point (cvtColor's weights and rounding)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def _pixels(img: Any, color: bool | None) -> np.ndarray:
    """The decoded pixels of a Pillow image as uint8 C×H×W (BGR or gray)."""
    mode = img.mode
    gray_file = mode in _GRAY_MODES or mode.startswith("I;16")
    if color is None:
        color = not gray_file
    if mode.startswith("I"):  # 16-bit gray (Pillow: I;16 or I): OpenCV keeps the high byte
        arr = np.clip(np.asarray(img).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return np.repeat(arr[None], 3, axis=0) if color else arr[None]
    if gray_file:
        arr = np.asarray(img.convert("L"))
        return np.repeat(arr[None], 3, axis=0) if color else arr[None]
    rgb = np.asarray(img.convert("RGB"))  # drops alpha, expands palettes
    if not color:
        return _to_gray(rgb)[None]
    return np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))  # HWC RGB -> CHW BGR


def decode_image(raw: bytes, color: bool | None = None) -> np.ndarray:
    """Decode image file bytes into uint8 (3, H, W) BGR or (1, H, W) gray.

    Args:
        raw: the bytes of an image file (JPEG, PNG, BMP, ...).
        color: True: 3 channels; False: 1 gray channel; None: as stored (gray files 1).

    Raises:
        errors.DataError: the bytes are not an image Pillow can decode.
    """
    image = _pil()
    try:
        with image.open(io.BytesIO(raw)) as img:
            if color is False and img.format == "JPEG":
                img.draft("L", img.size)  # libjpeg's own luma, as OpenCV's JPEG reader
            img.load()
            return _pixels(img, color)
    except (OSError, ValueError, SyntaxError) as e:
        raise errors.DataError(f"could not decode an encoded image ({len(raw)} bytes): "
                               f"{e}") from None


def resize_bilinear(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 C×H×W to C×height×width with OpenCV's INTER_LINEAR sampling."""

    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, fy = taps(arr.shape[1], height)
    x0, x1, fx = taps(arr.shape[2], width)
    a = arr.astype(np.float64)
    rows = a[:, y0] * (1 - fy)[:, None] + a[:, y1] * fy[:, None]       # (C, height, W)
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx              # (C, height, width)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def encode_image(arr: np.ndarray, encoding: str) -> bytes:
    """uint8 C×H×W (BGR or gray) as image file bytes of type ``encoding`` (jpg, png, ...)."""
    image = _pil()
    fmt = image.registered_extensions().get("." + encoding.lower())
    if fmt is None:
        raise errors.DataError(f"unknown image encoding {encoding!r}")
    pixels = arr[0] if arr.shape[0] == 1 else arr[::-1].transpose(1, 2, 0)  # -> HWC RGB
    buf = io.BytesIO()
    extra = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    image.fromarray(np.ascontiguousarray(pixels)).save(buf, format=fmt, **extra)
    return buf.getvalue()
