"""A small heat-map image writer: a matrix as coloured cells in an RGB PNG (zlib + struct only).

Used for the oracle assignment matrix (share of each class's examples won by each ensemble
member, Fig. 2 of "Why M Heads are Better than One"), but it draws any 2-D matrix. Values are
mapped linearly from ``[vmin, vmax]`` onto a perceptually ordered dark-blue → green → yellow
ramp; NaN cells are drawn grey. Optional row and column labels are drawn in a 3×5 pixel font
(digits, a few letters and punctuation; any other character is left blank).

Layout (pixels), with ``s = max(1, cell // 8)`` the font scale::

    left  = label width + 2s      (0 without row labels)
    top   = 5s + 2s               (0 without column labels)
    width  = left + cols · cell_w  where cell_w = max(cell, widest column label + 2s)
    height = top  + rows · cell
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_NAN = (160, 160, 160)
# Anchor colours of the ramp at 0, 1/4, 1/2, 3/4, 1 (dark blue → teal → green → yellow).
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
                 dtype=np.float64)

# 3×5 glyphs, one string of 15 bits per character (rows top to bottom, 3 columns each).
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", "-": "000000111000000", ".": "000000000000010",
    "_": "000000000000111", "m": "000000111111101", "c": "000000111100111",
    " ": "000000000000000",
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an image as an 8-bit RGB PNG.

    Args:
        rgb: (height, width, 3) array of values in [0, 255] (rounded and clipped).
    """
    img = np.clip(np.rint(np.asarray(rgb, np.float64)), 0, 255).astype(np.uint8)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"expected a non-empty (height, width, 3) image, got {img.shape}")
    height, width = img.shape[:2]
    # NOTE: every scanline starts with its filter type; 0 = none.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return (_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + _chunk(b"IEND", b""))


def colour(value: float, vmin: float = 0.0, vmax: float = 1.0) -> tuple[int, int, int]:
    """The ramp colour of ``value`` (clipped to ``[vmin, vmax]``); grey for NaN."""
    if math.isnan(value):
        return _NAN
    t = 0.0 if vmax <= vmin else min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    pos = t * (len(_RAMP) - 1)
    lo = min(int(pos), len(_RAMP) - 2)
    c = _RAMP[lo] + (pos - lo) * (_RAMP[lo + 1] - _RAMP[lo])
    r, g, b = (int(v) for v in np.rint(c))
    return (r, g, b)


def _text_width(text: str, scale: int) -> int:
    return 0 if not text else (4 * len(text) - 1) * scale


def _draw_text(img: np.ndarray, text: str, x: int, y: int, scale: int) -> None:
    """Draw ``text`` with its top-left corner at (x, y)."""
    for k, ch in enumerate(text):
        bits = _GLYPHS.get(ch, _GLYPHS[" "])
        for j, bit in enumerate(bits):
            if bit == "1":
                r, c = divmod(j, 3)
                x0, y0 = x + (4 * k + c) * scale, y + r * scale
                img[y0:y0 + scale, x0:x0 + scale] = _INK


def heatmap_image(
    matrix: Any,
    cell: int = 16,
    vmin: float = 0.0,
    vmax: float = 1.0,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Render ``matrix`` as a (height, width, 3) uint8 image (layout in the module docstring).

    Args:
        matrix: (rows, cols) values; cell (r, c) is drawn at row r, column c.
        cell: cell height (and minimum width) in pixels.
        vmin, vmax: the values mapped to the two ends of the colour ramp.
        row_labels, col_labels: optional text per row / column (``str()`` of anything).
    """
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {m.shape}")
    if cell < 1:
        raise ValueError(f"cell must be at least 1 pixel, got {cell}")
    rows, cols = m.shape
    rl = [str(s) for s in row_labels] if row_labels is not None else None
    cl = [str(s) for s in col_labels] if col_labels is not None else None
    for name, labels, n in (("row_labels", rl, rows), ("col_labels", cl, cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries for {n} {name[:3]}s")
    s = max(1, cell // 8)
    left = max(_text_width(t, s) for t in rl) + 2 * s if rl else 0
    top = 7 * s if cl else 0
    cell_w = max(cell, max(_text_width(t, s) for t in cl) + 2 * s) if cl else cell
    img = np.empty((top + rows * cell, left + cols * cell_w, 3), np.uint8)
    img[...] = _BACKGROUND
    for r in range(rows):
        for c in range(cols):
            y, x = top + r * cell, left + c * cell_w
            img[y:y + cell, x:x + cell_w] = colour(float(m[r, c]), vmin, vmax)
    for r, text in enumerate(rl or ()):
        _draw_text(img, text, s, top + r * cell + max(0, (cell - 5 * s) // 2), s)
    for c, text in enumerate(cl or ()):
        x = left + c * cell_w + max(0, (cell_w - _text_width(text, s)) // 2)
        _draw_text(img, text, x, s, s)
    return img


def heatmap_png(matrix: Any, **kwargs: Any) -> bytes:
    """:func:`heatmap_image` encoded as PNG bytes (same arguments)."""
    return png_bytes(heatmap_image(matrix, **kwargs))
