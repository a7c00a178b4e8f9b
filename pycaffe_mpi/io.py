"""pycaffe's ``caffe.io``: image loading and preprocessing, blob and datum conversion.

The file formats themselves (``.caffemodel``, ``.solverstate``, ``.binaryproto``) are read and
written by :mod:`pycaffe_mpi.snapshot`; this module gives pycaffe scripts their familiar names.

Images follow pycaffe's conventions: ``load_image`` gives H x W x K float32 in [0, 1] (RGB, or
one intensity channel); :class:`Transformer` turns such arrays into the K x H x W input of a net
and back. pycaffe resizes with scikit-image/SciPy; here :func:`resize_image` is plain NumPy
(nearest or bilinear, sampling at pixel centres with edge pixels repeated outside the image), so
resized pixels can differ slightly from pycaffe's near the borders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi.snapshot import (
    array_to_blobproto,
    array_to_datum,
    arraylist_to_blobprotovector_str,
    blobproto_to_array,
    blobprotovector_str_to_arraylist,
    datum_to_array,
)

__all__ = ["Transformer", "array_to_blobproto", "array_to_datum",
           "arraylist_to_blobprotovector_str", "blobproto_to_array",
           "blobprotovector_str_to_arraylist", "datum_to_array", "load_image", "oversample",
           "resize_image"]


class Transformer:
    """Prepare H' x W' x K arrays as K x H x W inputs of a net (pycaffe's ``caffe.io.Transformer``).

    Args:
        inputs: input blob name -> the blob's shape (N, K, H, W), e.g.
            ``{"data": net.blobs["data"].data.shape}``.

    ``preprocess`` applies, in this order: convert to float32; resize to H x W when the first two
    axes differ; ``transpose``; ``channel_swap`` (on the first axis after transposing);
    multiply by ``raw_scale``; subtract ``mean``; multiply by ``input_scale``. ``deprocess``
    undoes them in reverse order.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]) -> None:
        self.inputs = {k: tuple(int(d) for d in v) for k, v in inputs.items()}
        self.transpose: dict[str, Sequence[int]] = {}
        self.channel_swap: dict[str, Sequence[int]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise errors.PycaffeError(f"{in_} is not one of the net inputs: {self.inputs}")

    def preprocess(self, in_: str, data: Any) -> np.ndarray:
        """Format ``data`` (H' x W' x K) as the K x H x W input ``in_``; see the class doc."""
        self._check_input(in_)
        caffe_in = np.asarray(data).astype(np.float32, copy=False)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        # NOTE: copy before the in-place scaling so the caller's array is never changed
        caffe_in = np.array(caffe_in, dtype=np.float32)
        if in_ in self.raw_scale:
            caffe_in *= self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in -= self.mean[in_]
        if in_ in self.input_scale:
            caffe_in *= self.input_scale[in_]
        return caffe_in

    def deprocess(self, in_: str, data: Any) -> np.ndarray:
        """Undo :meth:`preprocess` (except the resize); ``data`` is squeezed first, as pycaffe."""
        self._check_input(in_)
        decaf_in = np.array(data, dtype=np.float32).squeeze()
        if in_ in self.input_scale:
            decaf_in /= self.input_scale[in_]
        if in_ in self.mean:
            decaf_in += self.mean[in_]
        if in_ in self.raw_scale:
            decaf_in /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """Axis order, e.g. (2, 0, 1) turns H x W x K into K x H x W."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise errors.PycaffeError("Transpose order needs to have the same number of "
                                      "dimensions as the input.")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """Channel order taken after transposing, e.g. (2, 1, 0) for RGB to BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise errors.PycaffeError("Channel swap needs to have the same number of "
                                      "dimensions as the input channels.")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Scale applied before the mean, e.g. 255 for models trained on [0, 255] pixels."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: Any) -> None:
        """Mean to subtract: one value per channel (K,), or K x H' x W' (resized to H x W).

        Raises:
            ValueError: the mean's channels or shape do not fit the input (as pycaffe).
        """
        self._check_input(in_)
        mean = np.asarray(mean)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1, *ms)
            if len(ms) != 3:
                raise ValueError("Mean shape invalid")
            if ms != self.inputs[in_][1:]:
                # pycaffe's way: normalise to [0, 1], resize as an image, scale back
                lo, hi = mean.min(), mean.max()
                normal = (mean.reshape(ms) - lo) / (hi - lo)
                resized = resize_image(normal.transpose((1, 2, 0)), self.inputs[in_][2:])
                mean = resized.transpose((2, 0, 1)) * (hi - lo) + lo
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Scale applied after the mean is subtracted."""
        self._check_input(in_)
        self.input_scale[in_] = scale


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """Read an image file as float32 in [0, 1], as pycaffe does.

    Args:
        filename: any format Pillow reads.
        color: True gives H x W x 3 RGB (gray images are repeated over three channels, alpha
            is dropped); False gives H x W x 1 intensity.

    Returns:
        the image, float32 in [0, 1].
    """
    from PIL import Image

    with Image.open(filename) as img:
        gray = img.mode in ("1", "L", "LA", "I;16", "I", "F")
        if gray:
            arr = _as_unit_float(np.asarray(img.convert("L") if img.mode == "LA" else img))
        else:
            arr = _as_unit_float(np.asarray(img.convert("RGB")))
    if not gray and not color:
        # skimage's rgb2gray (what pycaffe's as_grey reading uses), not Pillow's "L"
        arr = arr @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
        if color:
            arr = np.tile(arr, (1, 1, 3))
    return arr.astype(np.float32, copy=False)


def _as_unit_float(arr: np.ndarray) -> np.ndarray:
    """skimage's img_as_float: integers scaled by their type's maximum."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535 if arr.dtype == np.int32 and arr.max(initial=0) > 255 else \
            np.iinfo(arr.dtype).max
        return (arr.astype(np.float64) / top).astype(np.float32)
    return arr.astype(np.float32)


def resize_image(im: Any, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an H x W x K array to ``new_dims`` (height, width) x K.

    Args:
        im: the image (any number of channels, any value range).
        new_dims: (height, width).
        interp_order: 0 nearest neighbour, 1 bilinear (default).

    Returns:
        float32 array of shape (new_dims[0], new_dims[1], K); a constant image stays constant.
    """
    im = np.asarray(im)
    h, w = int(new_dims[0]), int(new_dims[1])
    if interp_order not in (0, 1):
        raise errors.PycaffeError(f"resize_image: interp_order {interp_order} is not "
                                  "supported (0 nearest, 1 bilinear)")
    lo, hi = float(im.min()), float(im.max())
    if hi == lo:
        return np.full((h, w, im.shape[-1]), lo, dtype=np.float32)
    out = im.astype(np.float64)
    for axis, n_out in ((0, h), (1, w)):
        out = _resize_axis(out, axis, n_out, interp_order)
    return out.astype(np.float32)


def _resize_axis(arr: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resample one axis, output pixel centres mapped onto input pixel centres."""
    n_in = arr.shape[axis]
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = np.clip(np.floor(pos + 0.5).astype(int), 0, n_in - 1)
        return np.take(arr, idx, axis=axis)
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(arr.ndim)])
    return np.take(arr, lo, axis=axis) * (1 - frac) + np.take(arr, hi, axis=axis) * frac


def oversample(images: Sequence[Any], crop_dims: Sequence[int]) -> np.ndarray:
    """Ten crops per image: the four corners, the centre, and the same five mirrored.

    Args:
        images: N images, each H x W x K (all the same shape).
        crop_dims: (height, width) of the crops.

    Returns:
        float32 array (10 N) x height x width x K; for each image the crops are top-left,
        top-right, bottom-left, bottom-right, centre, then those five flipped left-right.
    """
    im_shape = np.array(np.shape(images[0]))
    ch, cw = int(crop_dims[0]), int(crop_dims[1])
    tops = (0, int(im_shape[0]) - ch)
    lefts = (0, int(im_shape[1]) - cw)
    boxes = [(t, left) for t in tops for left in lefts]
    # pycaffe's centre: (centre - crop/2), truncated to int
    boxes.append((int(im_shape[0] / 2.0 - ch / 2.0), int(im_shape[1] / 2.0 - cw / 2.0)))
    crops = np.empty((10 * len(images), ch, cw, int(im_shape[-1])), dtype=np.float32)
    for i, im in enumerate(images):
        five = np.stack([np.asarray(im)[t:t + ch, left:left + cw, :] for t, left in boxes])
        crops[10 * i:10 * i + 5] = five
        crops[10 * i + 5:10 * i + 10] = five[:, :, ::-1, :]
    return crops
