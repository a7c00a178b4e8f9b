"""In-memory and image-file data layers: MemoryData and ImageData.

Both have no bottoms and no gradient (``backward`` does nothing) and preprocess whole
batches with the Data layer's :class:`~pycaffe_mpi.layer_types.data.DataTransformer`
(``transform_param``: crop, mirror, mean, scale); WindowData (R-CNN windows) crops,
warps and pads each sampled window itself, as Caffe's does.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.layer_types.data import DataTransformer
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

log = logging.getLogger(__name__)


def _put(layer: Layer, top: Sequence[Blob], arrays: Sequence[np.ndarray]) -> None:
    for t, arr in zip(top, arrays):
        t.reshape(arr.shape)
        backend_mod.upload(layer.xp, arr, t.data)  # a GPU: without waiting for it


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

    Backward: none (a data layer: as in Caffe, nothing is passed down).
    """

    is_data = True
    exact_num_bottom = 0
    exact_num_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.memory_data_param
        self.batch_size = int(p.batch_size)
        self.chw = (int(p.channels), int(p.height), int(p.width))
        sizes = dict(zip(("batch_size", "channels", "height", "width"),
                         (self.batch_size, *self.chw)))
        bad = next((k for k, v in sizes.items() if v <= 0), "batch_size")
        # the error names the first field at fault, so the user knows which one to set
        self.require(not any(v <= 0 for v in sizes.values()), f"memory_data_param.{bad}",
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

    Backward: none (a data layer: as in Caffe, nothing is passed down).
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


# == WindowData ================================================================================
def _cround(x: float) -> int:
    """C's ``round``: halves away from zero (Python's ``round`` goes to even)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


@register_layer("WindowData")
class WindowData(Layer):
    """R-CNN training windows: foreground and background boxes sampled from a window file.

    Params (``window_data_param``): source (window file: per image ``# index``, path,
    channels, height, width, number of windows, then per window ``label overlap x1 y1 x2
    y2``, all whitespace separated), root_folder (""), batch_size, fg_threshold (0.5: windows
    with overlap ≥ it are foreground, label > 0), bg_threshold (0.5: overlap < it are
    background, label 0), fg_fraction (0.25), context_pad (0), crop_mode ("warp" or
    "square"), cache_images (false: decode every image once at setup), scale (1; a
    transform_param scale wins). ``transform_param``: crop_size (required), mirror,
    mean_file or mean_value (one, or one per channel); the deprecated window_data_param
    crop_size/mirror/mean_file are honoured when transform_param does not set them.

    Shapes:
        top[0]: (batch_size, 3, crop_size, crop_size), BGR; top[1]: labels, (batch_size,).

    Forward (Caffe's ``load_batch``): batch_size − int(batch_size · fg_fraction) background
    windows, then the foreground ones, each drawn uniformly with replacement from
    ``self.rng`` (then a coin for mirroring when mirror is on). A window is grown by
    context_pad pixels of output (scale crop/(crop − 2·context_pad) about its centre;
    "square" first makes it square), clipped to the image, resized (bilinear, Pillow) to its
    share of crop_size × crop_size and placed at its padding offset, mirrored with the
    padding swapped; the rest of the output stays 0. Then y = (x − mean) · scale, with a
    mean_file mean read at the same output position offset by (mean width − crop_size)/2.
    Windows differ in size, so each is cut and resized on its own.

    Backward: none (a data layer: as in Caffe, nothing is passed down).
    """

    is_data = True
    exact_num_bottom = 0
    exact_num_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.window_data_param
        tp = self.layer_param.transform_param

        def pick(name: str) -> Any:  # transform_param first, else the deprecated field
            return getattr(p if p.HasField(name) and not tp.HasField(name) else tp, name)
        self.crop, self.mirror = int(pick("crop_size")), bool(pick("mirror"))
        self.scale = float(tp.scale if tp.HasField("scale") else p.scale)
        self.batch_size, self.context_pad = int(p.batch_size), int(p.context_pad)
        self.fg_fraction = float(p.fg_fraction)
        self.require(self.crop > 0, "transform_param.crop_size", "WindowData needs crop_size > 0")
        self.require(self.batch_size > 0, "window_data_param.batch_size",
                     f"expected a positive batch size, got {self.batch_size}")
        self.require(p.crop_mode in ("warp", "square"), "window_data_param.crop_mode",
                     f'expected "warp" or "square", got "{p.crop_mode}"')
        self.require(self.crop > 2 * self.context_pad, "window_data_param.context_pad",
                     f"context_pad {self.context_pad} leaves nothing of crop_size {self.crop}")
        self.square = p.crop_mode == "square"
        self.root_folder, self.source = p.root_folder, p.source
        self.images, self.fg, self.bg = self._read_windows(p)
        for what, pool in (("foreground", self.fg), ("background", self.bg)):
            errors.require(len(pool), self.layer_param, "window_data_param.source",
                           f"{self.source!r} has no {what} windows (overlap vs fg_threshold "
                           f"{p.fg_threshold} / bg_threshold {p.bg_threshold})",
                           exc=errors.DataError, location=self.location)
        self._cache: dict[int, np.ndarray] = {}
        if p.cache_images:
            for index in self.images:
                self._cache[index] = self._image(index)
        self.mean_file = pick("mean_file")
        self.mean = self._mean(self.mean_file, [float(v) for v in tp.mean_value])
        self.reshape(bottom, top)

    def _where(self) -> str:
        return errors.layer_where(self.layer_param, self.location)

    def _read_windows(self, p: Any) -> tuple[dict[int, tuple[str, int]], list, list]:
        try:
            with open(self.source) as f:
                tokens = [(tok, no) for no, line in enumerate(f, 1) for tok in line.split()]
        except OSError as e:
            raise errors.DataError(f"{self._where()}, field window_data_param.source: "
                                   f"failed to open window file {self.source!r}: {e}") from None
        errors.require(tokens, self.layer_param, "window_data_param.source",
                       f"window file {self.source!r} is empty", exc=errors.DataError,
                       location=self.location)
        images: dict[int, tuple[str, int]] = {}
        fg, bg = [], []
        pos = 0

        def take(n: int) -> list[tuple[str, int]]:
            nonlocal pos
            if pos + n > len(tokens):
                raise errors.DataError(f"{self.source}: ends in the middle of an image record "
                                       f"(for {self._where()})")
            pos += n
            return tokens[pos - n:pos]
        try:
            while pos < len(tokens):
                (hashtag, no), (index, _) = take(2)
                if hashtag != "#":
                    raise errors.DataError(f"{self.source}:{no}: expected '#', got {hashtag!r}")
                (path, path_no), (chans, _), _, _, (nwin, _) = take(5)
                if int(chans) != 3:
                    raise errors.DataError(f"{self.source}:{path_no}: {int(chans)} channels; "
                                           "WindowData reads colour (3-channel) images")
                images[int(index)] = (self.root_folder + path, path_no)
                for _ in range(int(nwin)):
                    row = take(6)
                    label, overlap = int(row[0][0]), float(row[1][0])
                    box = [int(t) for t, _ in row[2:]]
                    if overlap >= p.fg_threshold:
                        if label <= 0:
                            raise errors.DataError(f"{self.source}:{row[0][1]}: a foreground "
                                                   f"window needs a label > 0, got {label}")
                        fg.append((int(index), label, *box))
                    elif overlap < p.bg_threshold:
                        bg.append((int(index), 0, *box))
        except ValueError as e:
            raise errors.DataError(f"{self.source}: not a window file ({e}) (for "
                                   f"{self._where()})") from None
        return images, fg, bg

    def _mean(self, mean_file: str, values: list[float]) -> np.ndarray | None:
        self.require(not (mean_file and values), "transform_param.mean_value",
                     "give mean_file or mean_value, not both")
        if mean_file:
            mean = pio.read_binaryproto(mean_file).astype(np.float64)
            mean = mean.reshape(mean.shape[-3:])
            self.require(mean.shape[0] == 3 and min(mean.shape[1:]) >= self.crop,
                         "transform_param.mean_file",
                         f"mean of shape {mean.shape} needs 3 channels and at least "
                         f"{self.crop}x{self.crop} pixels")
            self.mean_off = (mean.shape[2] - self.crop) // 2
            return mean
        if values:
            self.require(len(values) in (1, 3), "transform_param.mean_value",
                         f"give 1 mean_value or one per channel (3); got {len(values)}")
            return np.asarray(values * (3 if len(values) == 1 else 1)).reshape(3, 1, 1)
        return None

    def _image(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        path, no = self.images[index]
        try:
            from PIL import Image

            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))[:, :, ::-1]  # H, W, BGR
        except OSError as e:
            raise errors.DataError(f"{self.source}:{no}: could not load image {path!r} (for "
                                   f"{self._where()}): {e}") from None

    def _geometry(self, box: Sequence[int], rows: int, cols: int, mirror: bool
                  ) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
        """(x1, y1, x2, y2) clipped source box, (height, width) to resize it to, and the
        (pad_h, pad_w) offset of the result in the output (Caffe's context/square maths)."""
        x1, y1, x2, y2 = box
        crop = self.crop
        if not (self.context_pad > 0 or self.square):
            return (x1, y1, x2, y2), (crop, crop), (0, 0)
        context = crop / (crop - 2 * self.context_pad)
        half_h, half_w = (y2 - y1 + 1) / 2.0, (x2 - x1 + 1) / 2.0
        cx, cy = x1 + half_w, y1 + half_h
        if self.square:
            half_h = half_w = max(half_h, half_w)
        x1, x2 = _cround(cx - half_w * context), _cround(cx + half_w * context)
        y1, y2 = _cround(cy - half_h * context), _cround(cy + half_h * context)
        unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
        px1, py1 = max(0, -x1), max(0, -y1)
        px2, py2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + px1, x2 - px2, y1 + py1, y2 - py2
        sx, sy = crop / unclipped_w, crop / unclipped_h
        out_w, out_h = _cround((x2 - x1 + 1) * sx), _cround((y2 - y1 + 1) * sy)
        pad_h = _cround(py1 * sy)
        pad_w = _cround((px2 if mirror else px1) * sx)
        out_h, out_w = min(out_h, crop - pad_h), min(out_w, crop - pad_w)
        return (x1, y1, x2, y2), (out_h, out_w), (pad_h, pad_w)

    def _window(self, window: Sequence[int], mirror: bool) -> tuple[np.ndarray, int, int]:
        """The window's pixels (3, h, w) float64, resized and mirrored, and its offset."""
        img = self._image(window[0])
        (x1, y1, x2, y2), (h, w), (pad_h, pad_w) = self._geometry(
            window[2:], img.shape[0], img.shape[1], mirror)
        roi = np.ascontiguousarray(img[y1:y2 + 1, x1:x2 + 1])
        if roi.shape[:2] != (h, w):
            from PIL import Image

            roi = np.asarray(Image.fromarray(roi).resize((max(w, 1), max(h, 1)),
                                                         Image.BILINEAR))
        if mirror:
            roi = roi[:, ::-1]
        return roi.transpose(2, 0, 1).astype(np.float64), pad_h, pad_w

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(self.batch_size, 3, self.crop, self.crop)
        top[1].reshape(self.batch_size)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        out = np.zeros((self.batch_size, 3, self.crop, self.crop))
        labels = np.zeros(self.batch_size)
        n_fg = int(self.batch_size * self.fg_fraction)
        item = 0
        for pool, n in ((self.bg, self.batch_size - n_fg), (self.fg, n_fg)):
            for _ in range(n):  # windows differ in size: each is cut and resized alone
                window = pool[int(self.rng.integers(len(pool)))]
                mirror = self.mirror and bool(self.rng.integers(2))
                pix, ph, pw = self._window(window, mirror)
                h, w = pix.shape[1:]
                if self.mean is not None and self.mean_file:
                    o = self.mean_off
                    pix -= self.mean[:, o + ph:o + ph + h, o + pw:o + pw + w]
                elif self.mean is not None:
                    pix -= self.mean
                out[item, :, ph:ph + h, pw:pw + w] = pix * self.scale
                labels[item] = window[1]
                item += 1
        _put(self, top, (out.astype(self.dtype), labels.astype(self.dtype)))
