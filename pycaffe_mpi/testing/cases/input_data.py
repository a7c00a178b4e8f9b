"""Layer cases for MemoryData and ImageData.

Neither has a gradient (grad=False) or bottoms. The MemoryData cases hand the layer a fixed
array set through ``reset`` (the case's ``prepare``). The ImageData cases read three tiny
PNG files (lossless, so the pixels are known) listed in a text file, written with Pillow
into a temporary directory when this module is imported (removed at exit); the references
rebuild the batches from the known pixels with loops (BGR order for colour images).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np

from pycaffe_mpi.layer import TEST
from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

# -- MemoryData --------------------------------------------------------------------------------

_X = np.random.default_rng(31).uniform(0, 10, (6, 2, 3, 4))
_Y = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])


def _reset(layer):
    layer.reset(_X, _Y)


def _memory_ref(batch, crop=0, mean=None, scale=1.0):
    def ref(bottoms, layer):
        n, c, h, w = _X.shape
        oh, ow = (crop, crop) if crop else (h, w)
        h_off, w_off = (h - oh) // 2, (w - ow) // 2  # TEST phase: centred crop
        data = np.zeros((batch, c, oh, ow))
        labels = np.zeros(batch)
        for i in range(batch):
            for ch in range(c):
                for y in range(oh):
                    for x in range(ow):
                        v = _X[i % n, ch, y + h_off, x + w_off]
                        if mean is not None:
                            v -= mean[ch]
                        data[i, ch, y, x] = v * scale
            labels[i] = _Y[i % n]
        return [data, labels]
    return ref


add_case(LayerCase(
    type="MemoryData", id="plain", ntop=2, grad=False, reshape=(), prepare=_reset,
    proto="memory_data_param { batch_size: 3 channels: 2 height: 3 width: 4 }",
    reference=_memory_ref(3)))

add_case(LayerCase(
    type="MemoryData", id="crop_mean_scale", ntop=2, grad=False, reshape=(), phase=TEST,
    prepare=_reset,
    proto=("memory_data_param { batch_size: 2 channels: 2 height: 3 width: 4 } "
           "transform_param { crop_size: 2 mean_value: 1 mean_value: 2 scale: 0.5 }"),
    reference=_memory_ref(2, crop=2, mean=[1.0, 2.0], scale=0.5)))

# -- ImageData ---------------------------------------------------------------------------------

_DIR = tempfile.mkdtemp(prefix="pycaffe-image-case-")
atexit.register(shutil.rmtree, _DIR, True)
_RGB = np.random.default_rng(32).integers(0, 256, (3, 4, 5, 3)).astype(np.uint8)  # N,H,W,RGB
_LABELS = [7, 0, 2]
_LIST = os.path.join(_DIR, "list.txt")


def _write_images() -> None:
    from PIL import Image

    os.makedirs(os.path.join(_DIR, "imgs"))
    lines = []
    for i, (img, lab) in enumerate(zip(_RGB, _LABELS)):
        Image.fromarray(img, "RGB").save(os.path.join(_DIR, "imgs", f"im{i}.png"))
        lines.append(f"imgs/im{i}.png {lab}")
    with open(_LIST, "w") as f:
        f.write("\n".join(lines) + "\n")


_write_images()


def _gray(rgb):
    # Pillow's "L" conversion: L = R*299/1000 + G*587/1000 + B*114/1000, rounded
    r, g, b = (int(v) for v in rgb)
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _image_ref(batch, color=True, crop=0, mean=None):
    def ref(bottoms, layer):
        n, h, w, _ = _RGB.shape
        c = 3 if color else 1
        oh, ow = (crop, crop) if crop else (h, w)
        h_off, w_off = (h - oh) // 2, (w - ow) // 2
        data = np.zeros((batch, c, oh, ow))
        for i in range(batch):
            img = _RGB[i % n]
            for y in range(oh):
                for x in range(ow):
                    px = img[y + h_off, x + w_off]
                    vals = [px[2], px[1], px[0]] if color else [_gray(px)]  # BGR
                    for ch in range(c):
                        data[i, ch, y, x] = float(vals[ch]) - (mean[ch] if mean else 0.0)
        return [data, np.array([_LABELS[i % n] for i in range(batch)], float)]
    return ref


add_case(LayerCase(
    type="ImageData", id="color_wraps_root_folder", ntop=2, grad=False, reshape=(),
    phase=TEST,
    proto=(f'image_data_param {{ source: "{_LIST}" root_folder: "{_DIR}/" batch_size: 4 }} '
           "transform_param { crop_size: 3 mean_value: 10 mean_value: 20 mean_value: 30 }"),
    reference=_image_ref(4, crop=3, mean=[10.0, 20.0, 30.0])))

add_case(LayerCase(
    type="ImageData", id="gray", ntop=2, grad=False, reshape=(), phase=TEST,
    proto=(f'image_data_param {{ source: "{_LIST}" root_folder: "{_DIR}/" batch_size: 2 '
           "is_color: false }"),
    reference=_image_ref(2, color=False)))

# -- WindowData --------------------------------------------------------------------------------
# one 8x10 image, one foreground and one background window, both crop_size (4x4) large, so
# sampling is certain and no resizing happens: the reference cuts the boxes out by hand
_WIN_RGB = np.random.default_rng(33).integers(0, 256, (8, 10, 3)).astype(np.uint8)
_WINDOWS = os.path.join(_DIR, "windows.txt")
_FG_BOX, _BG_BOX = (1, 2, 4, 5), (5, 3, 8, 6)  # x1 y1 x2 y2


def _write_windows() -> None:
    from PIL import Image

    Image.fromarray(_WIN_RGB, "RGB").save(os.path.join(_DIR, "imgs", "win.png"))
    with open(_WINDOWS, "w") as f:
        f.write("# 0\nimgs/win.png\n3\n8\n10\n3\n")
        f.write("3 0.9 {} {} {} {}\n".format(*_FG_BOX))
        f.write("5 0.1 {} {} {} {}\n".format(*_BG_BOX))
        f.write("2 0.3 0 0 3 3\n")  # between bg_threshold 0.2 and fg 0.5: never sampled


_write_windows()


def _window_ref(batch, n_fg, mean, scale):
    def ref(bottoms, layer):
        data = np.zeros((batch, 3, 4, 4))
        labels = np.zeros(batch)
        for i in range(batch):
            fg = i >= batch - n_fg  # background windows come first
            x1, y1, _, _ = _FG_BOX if fg else _BG_BOX
            for c in range(3):
                for y in range(4):
                    for x in range(4):
                        v = float(_WIN_RGB[y1 + y, x1 + x, 2 - c])  # BGR
                        data[i, c, y, x] = (v - mean[c]) * scale
            labels[i] = 3.0 if fg else 0.0
        return [data, labels]
    return ref


add_case(LayerCase(
    type="WindowData", id="fg_then_bg_no_resize", ntop=2, grad=False, reshape=(),
    proto=(f'window_data_param {{ source: "{_WINDOWS}" root_folder: "{_DIR}/" batch_size: 4 '
           "fg_fraction: 0.5 bg_threshold: 0.2 scale: 0.5 } "
           "transform_param { crop_size: 4 mean_value: 10 mean_value: 20 mean_value: 30 }"),
    reference=_window_ref(4, 2, [10.0, 20.0, 30.0], 0.5)))
