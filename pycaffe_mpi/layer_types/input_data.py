"""In-memory and image-file data layers: MemoryData and ImageData.

Both have no bottoms and no gradient (``backward`` does nothing) and preprocess whole
batches with the Data layer's :class:`~pycaffe_mpi.layer_types.data.DataTransformer`
(``transform_param``: crop, mirror, mean, scale). WindowData (R-CNN windows) is not
implemented.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.layer_types.data import DataTransformer
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

log = logging.getLogger(__name__)


def _put(layer: Layer, top: Sequence[Blob], arrays: Sequence[np.ndarray]) -> None:
    for t, arr in zip(top, arrays):
        t.reshape(arr.shape)
        t.data[...] = arr if layer.xp is np else layer.xp.asarray(arr)


# == MemoryData ================================================================================
@register_layer("MemoryData")
class MemoryData(Layer):
    """Batches from arrays handed over with :meth:`reset` (pycaffe's ``Net.set_input_arrays``).

    Params (``memory_data_param``): batch_size, channels, height, width (all required,
    positive). ``transform_param``: see :class:`DataTransformer`; it is applied to each batch
    as it is served (Caffe's ``Reset`` serves arrays untransformed, with a warning).

    Shapes:
        top[0]: (batch_size, channels, H', W'): H' = W' = crop_size when cropping, else
            height, width.
        top[1]: labels, (batch_size,).

    Forward: the next batch_size examples of the arrays, wrapping round to the first after
    the last. Forward before any :meth:`reset` is an error (Caffe: "needs to be initialized
    by calling Reset"). The arrays are copied, so the caller may reuse them.
    """

    is_data = True
    exact_num_bottom = 0
    exact_num_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.memory_data_param
        self.batch_size = int(p.batch_size)
        self.chw = (int(p.channels), int(p.height), int(p.width))
        self.require(self.batch_size > 0 and min(self.chw) > 0, "memory_data_param",
                     "batch_size, channels, height, and width must be specified and positive; "
                     f"got {self.batch_size}, {self.chw[0]}, {self.chw[1]}, {self.chw[2]}")
        self.transformer = DataTransformer(self.layer_param, self.layer_param.transform_param,
                                           self.phase)
        c, h, w = self.transformer.setup(self.chw, self.dtype)
        self.top_shapes = [(self.batch_size, c, h, w), (self.batch_size,)]
        self.data: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.pos = 0
        self.reshape(bottom, top)

    def reset(self, data: Any, labels: Any) -> None:
        """Serve ``data`` (N, channels, height, width) and ``labels`` (N values: (N,) or
        (N, 1, 1, 1)) from the next forward on, starting at example 0.

        N must be a positive multiple of batch_size. Raises ``DataError`` otherwise.
        """
        data = np.asarray(data)
        labels = np.asarray(labels)
        n = data.shape[0] if data.ndim else 0

        def check(cond: Any, msg: str) -> None:
            errors.require(cond, self.layer_param, "reset", msg, exc=errors.DataError,
                           location=self.location)
        check(data.ndim == 4 and data.shape[1:] == self.chw,
              f"data must have shape (N, {', '.join(map(str, self.chw))}) as "
              f"memory_data_param says; got {data.shape}")
        check(n > 0 and n % self.batch_size == 0,
              f"the number of examples ({n}) must be a positive multiple of the batch size "
              f"({self.batch_size})")
        check(labels.size == n and (labels.ndim == 1 or labels.shape[0] == n),
              f"labels must hold one value per example ({n}); got shape {labels.shape}")
        self.data = np.array(data, dtype=self.dtype if data.dtype != np.uint8 else np.uint8)
        self.labels = np.array(labels.reshape(n), dtype=self.dtype)
        self.pos = 0

    def set_batch_size(self, batch_size: int) -> None:
        """Caffe's ``set_batch_size``: serve batches of ``batch_size`` from now on."""
        self.require(batch_size > 0, "memory_data_param.batch_size",
                     f"expected a positive batch size, got {batch_size}")
        self.batch_size = int(batch_size)
        self.top_shapes = [(self.batch_size, *self.top_shapes[0][1:]), (self.batch_size,)]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t, shape in zip(top, self.top_shapes):
            t.reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.data is None or self.labels is None:
            raise errors.DataError(
                f"{errors.layer_where(self.layer_param, self.location)} needs data: call "
                "reset(data, labels) (Net.set_input_arrays) before forward")
        n = len(self.data)
        idx = (self.pos + np.arange(self.batch_size)) % n
        batch = self.transformer(self.data[idx], self.rng, self.dtype)
        _put(self, top, (batch, self.labels[idx]))
        self.pos = int((self.pos + self.batch_size) % n)

    def get_state(self) -> bytes:
        return json.dumps({"pos": self.pos, "rng": self.rng.bit_generator.state}).encode()

    def set_state(self, state: bytes) -> None:
        s = json.loads(state)
        self.pos = int(s["pos"])
        self.rng.bit_generator.state = s["rng"]


# == ImageData =================================================================================
def read_image(path: str, is_color: bool, new_height: int = 0, new_width: int = 0
               ) -> np.ndarray:
    """An image file as uint8 (C, H, W): BGR (Caffe's OpenCV order) when ``is_color``, else
    one gray channel; resized (bilinear) to new_height × new_width when both are > 0.

    Raises ``OSError`` when the file cannot be read or decoded.
    """
    from PIL import Image  # a dependency, imported late so `import pycaffe_mpi` stays light

    with Image.open(path) as img:
        img = img.convert("RGB" if is_color else "L")
        if new_height > 0 and new_width > 0:
            img = img.resize((new_width, new_height), Image.BILINEAR)
        arr = np.asarray(img)
    if not is_color:
        return arr[None]
    return np.ascontiguousarray(arr[:, :, ::-1].transpose(2, 0, 1))  # HWC RGB -> CHW BGR


@register_layer("ImageData")
class ImageData(Layer):
    """Batches of image files named in a list file, with their labels.

    Params (``image_data_param``): source (list file, one "relative/path label" per line;
    the label follows the last space), root_folder ("": prepended to every path as a
    string, as Caffe does), batch_size (1), shuffle (false), rand_skip (0: skip a random
    number < rand_skip of lines at the start), new_height / new_width (0: resize every image,
    both or neither), is_color (true: 3 channels in BGR order; false: 1 gray channel). The
    deprecated image_data_param scale/mean_file/crop_size/mirror are honoured when
    transform_param does not set them. ``transform_param``: see :class:`DataTransformer`.

    Shapes:
        top[0]: (batch_size, C, H', W'): C = 3 or 1; H × W = the first image's size (or
            new_height × new_width), or crop_size × crop_size when cropping.
        top[1]: labels, (batch_size,).

    Forward: the next batch_size lines, wrapping round at the end of the list (reshuffled
    each time with shuffle); images are decoded with Pillow (bilinear resizing, so pixels
    may differ slightly from OpenCV's), stacked and transformed as one batch. Every image of
    a batch must have the first image's size unless resized. Shuffle order, rand_skip and
    random crops/mirrors come from ``self.rng``; ``get_state`` holds the position and order,
    so a resumed run reads the same batches. Images are read in the training thread (no
    prefetch).
    """

    is_data = True
    exact_num_bottom = 0
    min_top = 1
    max_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.image_data_param
        self.source = p.source
        self.root_folder = p.root_folder
        self.batch_size = int(p.batch_size)
        self.require(self.batch_size > 0, "image_data_param.batch_size",
                     f"positive batch size required, got {self.batch_size}")
        self.new_hw = (int(p.new_height), int(p.new_width))
        self.require(self.new_hw == (0, 0) or min(self.new_hw) > 0,
                     "image_data_param.new_height",
                     "new_height and new_width must be set at the same time")
        self.is_color = bool(p.is_color)
        self.shuffle = bool(p.shuffle)
        self.lines = self._read_list()
        self.order = np.arange(len(self.lines))
        if self.shuffle:
            self.rng.shuffle(self.order)
        self.pos = 0
        if p.rand_skip:
            skip = int(self.rng.integers(p.rand_skip))
            self.require(len(self.lines) > skip, "image_data_param.rand_skip",
                         f"not enough lines ({len(self.lines)}) to skip {skip}")
            self.pos = skip
        self.transformer = DataTransformer(self.layer_param, self._transform_param(),
                                           self.phase)
        first = self._read(self.order[self.pos])
        c, h, w = self.transformer.setup(first.shape, self.dtype)
        self.top_shapes = [(self.batch_size, c, h, w), (self.batch_size,)]
        self.reshape(bottom, top)

    def _transform_param(self) -> Any:
        tp = caffe_pb2.TransformationParameter()
        tp.CopyFrom(self.layer_param.transform_param)
        ip = self.layer_param.image_data_param
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if ip.HasField(name) and not tp.HasField(name):
                log.warning("%s: image_data_param.%s is deprecated; use transform_param.%s",
                            errors.layer_where(self.layer_param), name, name)
                setattr(tp, name, getattr(ip, name))
        return tp

    def _read_list(self) -> list[tuple[str, int, int]]:
        """(path, label, line number) per non-blank line of the list file."""
        self.require(bool(self.source), "image_data_param.source", "no list file given")
        try:
            with open(self.source) as f:
                text = f.read().splitlines()
        except OSError as e:
            raise errors.DataError(f"{self._where()}, field image_data_param.source: cannot "
                                   f"read the list file {self.source!r}: {e}") from None
        lines = []
        for no, line in enumerate(text, 1):
            line = line.rstrip()
            if not line:
                continue
            path, _, label = line.rpartition(" ")
            try:
                lines.append((path, int(label), no))
            except ValueError:
                raise errors.DataError(f"{self.source}:{no}: expected 'path label', got "
                                       f"{line!r} (for {self._where()})") from None
        errors.require(lines, self.layer_param, "image_data_param.source",
                       f"the list file {self.source!r} is empty", exc=errors.DataError,
                       location=self.location)
        return lines

    def _where(self) -> str:
        return errors.layer_where(self.layer_param, self.location)

    def _read(self, i: int) -> np.ndarray:
        path, _, no = self.lines[i]
        full = self.root_folder + path
        try:
            return read_image(full, self.is_color, *self.new_hw)
        except OSError as e:
            raise errors.DataError(f"{self.source}:{no}: could not load image {full!r} (for "
                                   f"{self._where()}): {e}") from None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t, shape in zip(top, self.top_shapes):
            t.reshape(shape)

    def _next_indices(self) -> list[int]:
        out = []
        for _ in range(self.batch_size):  # list bookkeeping only; pixels are batched below
            out.append(int(self.order[self.pos]))
            self.pos += 1
            if self.pos == len(self.order):
                self.pos = 0
                if self.shuffle:
                    self.rng.shuffle(self.order)
        return out

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        indices = self._next_indices()
        images = [self._read(i) for i in indices]
        for i, img in zip(indices, images):
            if img.shape != images[0].shape:
                path, _, no = self.lines[i]
                raise errors.DataError(
                    f"{self.source}:{no}: image {path!r} is {img.shape[2]}x{img.shape[1]}, "
                    f"the batch's first {images[0].shape[2]}x{images[0].shape[1]}; set "
                    f"new_height and new_width to resize (for {self._where()})")
        batch = self.transformer(np.stack(images), self.rng, self.dtype)
        labels = np.array([self.lines[i][1] for i in indices], dtype=self.dtype)
        _put(self, top, (batch, labels))

    def get_state(self) -> bytes:
        return json.dumps({"pos": self.pos, "order": self.order.tolist(),
                           "rng": self.rng.bit_generator.state}).encode()

    def set_state(self, state: bytes) -> None:
        s = json.loads(state)
        self.pos = int(s["pos"])
        self.order = np.asarray(s["order"], dtype=np.int64)
        self.rng.bit_generator.state = s["rng"]
