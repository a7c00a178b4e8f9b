"""ImageData and MemoryData beyond the generic layer cases: list-file parsing and errors,
shuffling, rand_skip, resizing, mirroring, resumable state; MemoryData's reset checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import layer_class

N_IMAGES = 5


def _images(tmp_path: Path, sizes: Any = None) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    pix = rng.integers(0, 256, (N_IMAGES, 4, 6, 3)).astype(np.uint8)  # N, H, W, RGB
    lines = []
    for i in range(N_IMAGES):
        img = Image.fromarray(pix[i], "RGB")
        if sizes is not None:
            img = img.resize(sizes[i])
        img.save(tmp_path / f"im{i}.png")
        lines.append(f"im{i}.png {i}")  # label = index identifies the image
    src = tmp_path / "list.txt"
    src.write_text("\n".join(lines) + "\n")
    return src, pix


def _layer(type_: str, proto: str, phase: int = TRAIN, ntop: int = 2, seed: int = 5,
           dtype: Any = np.float64) -> tuple[Any, list[Blob]]:
    p = caffe_pb2.LayerParameter(name="in", type=type_, top=[f"t{i}" for i in range(ntop)])
    text_format.Merge(proto, p)
    layer = layer_class(type_)(p, phase=phase, dtype=dtype, rng=np.random.default_rng(seed))
    top = [Blob((), dtype) for _ in range(ntop)]
    layer.setup([], top)
    return layer, top


def _image_layer(tmp_path: Path, src: Path, extra: str = "", transform: str = "",
                 **kw: Any) -> tuple[Any, list[Blob]]:
    return _layer("ImageData", f'image_data_param {{ source: "{src}" root_folder: '
                  f'"{tmp_path}/" {extra} }} {transform}', **kw)


# -- ImageData ---------------------------------------------------------------------------------
def test_bgr_pixels_and_labels(tmp_path: Path) -> None:
    src, pix = _images(tmp_path)
    layer, top = _image_layer(tmp_path, src, "batch_size: 3", phase=TEST)
    layer.forward([], top)
    assert top[0].shape == (3, 3, 4, 6)
    np.testing.assert_array_equal(top[0].data, pix[:3, :, :, ::-1].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(top[1].data, [0, 1, 2])
    layer.forward([], top)
    np.testing.assert_array_equal(top[1].data, [3, 4, 0])  # wraps round


def test_shuffle_covers_every_image_each_epoch(tmp_path: Path) -> None:
    src, pix = _images(tmp_path)
    layer, top = _image_layer(tmp_path, src, f"batch_size: {N_IMAGES} shuffle: true")
    orders = []
    for _ in range(3):
        layer.forward([], top)
        labels = top[1].data.astype(int)
        assert sorted(labels) == list(range(N_IMAGES))
        np.testing.assert_array_equal(top[0].data,
                                      pix[labels][:, :, :, ::-1].transpose(0, 3, 1, 2))
        orders.append(tuple(labels))
    assert len(set(orders)) > 1


def test_rand_skip_and_state_resume(tmp_path: Path) -> None:
    src, _ = _images(tmp_path)
    skips = set()
    for seed in range(8):
        layer, top = _image_layer(tmp_path, src, "batch_size: 1 rand_skip: 4", seed=seed)
        layer.forward([], top)
        skips.add(int(top[1].data[0]))
    assert skips <= {0, 1, 2, 3} and len(skips) > 1
    a, ta = _image_layer(tmp_path, src, "batch_size: 2 shuffle: true",
                         "transform_param { mirror: true crop_size: 3 }")
    a.forward([], ta)
    state = a.get_state()
    want = []
    for _ in range(4):
        a.forward([], ta)
        want.append(ta[0].data.copy())
    b, tb = _image_layer(tmp_path, src, "batch_size: 2 shuffle: true",
                         "transform_param { mirror: true crop_size: 3 }", seed=77)
    b.set_state(state)
    for w in want:
        b.forward([], tb)
        np.testing.assert_array_equal(tb[0].data, w)


def test_resize_gray_and_mixed_sizes(tmp_path: Path) -> None:
    sizes = [(6, 4), (5, 3), (6, 4), (6, 4), (6, 4)]
    src, _ = _images(tmp_path, sizes)
    layer, top = _image_layer(tmp_path, src, "batch_size: 2 new_height: 7 new_width: 8 "
                              "is_color: false")
    layer.forward([], top)
    assert top[0].shape == (2, 1, 7, 8)
    plain, ptop = _image_layer(tmp_path, src, "batch_size: 2")
    with pytest.raises(errors.DataError, match=r"list\.txt:2: image 'im1\.png' is 5x3"):
        plain.forward([], ptop)


def test_constant_image_stays_constant_when_resized(tmp_path: Path) -> None:
    Image.new("RGB", (3, 2), (10, 20, 30)).save(tmp_path / "c.png")
    src = tmp_path / "c.txt"
    src.write_text("c.png 1\n")
    layer, top = _image_layer(tmp_path, src, "batch_size: 1 new_height: 5 new_width: 4",
                              phase=TEST)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data[0, :, 0, 0], [30, 20, 10])  # BGR
    assert (top[0].data[0] == top[0].data[0, :, :1, :1]).all()


def test_mirror_in_train(tmp_path: Path) -> None:
    src, pix = _images(tmp_path)
    layer, top = _image_layer(tmp_path, src, f"batch_size: {N_IMAGES}",
                              "transform_param { mirror: true }")
    layer.forward([], top)
    bgr = pix[:, :, :, ::-1].transpose(0, 3, 1, 2).astype(float)
    flipped = [bool((top[0].data[i] == bgr[i, :, :, ::-1]).all()) for i in range(N_IMAGES)]
    kept = [bool((top[0].data[i] == bgr[i]).all()) for i in range(N_IMAGES)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped)


def test_image_errors_name_list_file_and_line(tmp_path: Path) -> None:
    src, _ = _images(tmp_path)
    (tmp_path / "im3.png").unlink()
    layer, top = _image_layer(tmp_path, src, "batch_size: 2")
    layer.forward([], top)
    with pytest.raises(errors.DataError, match=r"list\.txt:4: could not load image .*im3\.png"):
        layer.forward([], top)
    with pytest.raises(errors.NetError, match="new_height and new_width"):
        _image_layer(tmp_path, src, "new_height: 3")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(errors.DataError, match="is empty"):
        _image_layer(tmp_path, empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("im0.png 1\nim1.png x\n")
    with pytest.raises(errors.DataError, match=r"bad\.txt:2: expected 'path label'"):
        _image_layer(tmp_path, bad)
    with pytest.raises(errors.DataError, match="cannot read the list file"):
        _image_layer(tmp_path, tmp_path / "none.txt")


def test_image_data_float32(tmp_path: Path) -> None:
    src, pix = _images(tmp_path)
    layer, top = _image_layer(tmp_path, src, "batch_size: 2", "transform_param { scale: 0.5 }",
                              dtype=np.float32)
    layer.forward([], top)
    assert top[0].data.dtype == np.float32
    np.testing.assert_array_equal(top[0].data, pix[:2, :, :, ::-1].transpose(0, 3, 1, 2) * 0.5)


# -- MemoryData --------------------------------------------------------------------------------
MEM = "memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 }"


def test_memory_data_reset_and_wrap() -> None:
    layer, top = _layer("MemoryData", MEM)
    x = np.arange(4 * 6, dtype=np.float32).reshape(4, 1, 2, 3)
    layer.reset(x, np.array([[[[1.0]]], [[[2.0]]], [[[3.0]]], [[[4.0]]]]))  # (N,1,1,1) labels
    x[...] = -1  # the layer keeps its own copy
    seen = []
    for _ in range(3):
        layer.forward([], top)
        seen.append(top[1].data.copy())
        assert top[0].shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(np.concatenate(seen), [1, 2, 3, 4, 1, 2])
    state = layer.get_state()
    layer.forward([], top)
    after = top[1].data.copy()
    layer.set_state(state)
    layer.forward([], top)
    np.testing.assert_array_equal(top[1].data, after)


def test_memory_data_checks() -> None:
    with pytest.raises(errors.NetError, match="must be specified and positive"):
        _layer("MemoryData", "memory_data_param { batch_size: 2 channels: 1 height: 2 }")
    layer, top = _layer("MemoryData", MEM)
    with pytest.raises(errors.DataError, match="call reset"):
        layer.forward([], top)
    with pytest.raises(errors.DataError, match="multiple of the batch size"):
        layer.reset(np.zeros((3, 1, 2, 3)), np.zeros(3))
    with pytest.raises(errors.DataError, match=r"shape \(N, 1, 2, 3\)"):
        layer.reset(np.zeros((2, 1, 3, 2)), np.zeros(2))
    with pytest.raises(errors.DataError, match="one value per example"):
        layer.reset(np.zeros((2, 1, 2, 3)), np.zeros(3))


def test_memory_data_mirror_and_batch_size() -> None:
    layer, top = _layer("MemoryData", MEM + " transform_param { mirror: true }")
    x = np.arange(2 * 6, dtype=float).reshape(2, 1, 2, 3)
    layer.reset(x, np.zeros(2))
    outs = set()
    for _ in range(10):
        layer.forward([], top)
        for i in range(2):
            got = top[0].data[i]
            assert (got == x[i]).all() or (got == x[i][:, :, ::-1]).all()
            outs.add((i, bool((got == x[i]).all())))
    assert len(outs) == 4  # each example seen both mirrored and not
    layer.set_batch_size(1)
    layer.reshape([], top)
    layer.forward([], top)
    assert top[0].shape == (1, 1, 2, 3)


# -- WindowData --------------------------------------------------------------------------------
def _window_layer(tmp_path: Path, windows: str, extra: str = "", transform: str = "",
                  **kw: Any) -> tuple[Any, list[Blob]]:
    Image.new("RGB", (10, 10), (100, 100, 100)).save(tmp_path / "const.png")
    src = tmp_path / "windows.txt"
    src.write_text(windows)
    return _layer("WindowData", f'window_data_param {{ source: "{src}" root_folder: '
                  f'"{tmp_path}/" {extra} }} transform_param {{ {transform} }}', **kw)


CONST = "# 0\nconst.png\n3 10 10\n2\n1 0.9 0 0 3 3\n0 0.1 0 0 3 3\n"


def test_window_context_pad_geometry(tmp_path: Path) -> None:
    # box 4x4 at the corner, crop 8, context_pad 2: grown ×2 about its centre to x, y in
    # [-2, 6]; the 2 pixels outside the image become round(2·8/9) = 2 rows/columns of zeros
    # and the clipped 7x7 part is resized to round(7·8/9) = 6
    layer, top = _window_layer(tmp_path, CONST, "batch_size: 2 fg_fraction: 1 context_pad: 2",
                               "crop_size: 8")
    layer.forward([], top)
    want = np.zeros((3, 8, 8))
    want[:, 2:, 2:] = 100
    np.testing.assert_array_equal(top[0].data[0], want)
    np.testing.assert_array_equal(top[1].data, [1, 1])
    mirrored, mtop = _window_layer(tmp_path, CONST, "batch_size: 8 fg_fraction: 1 "
                                   "context_pad: 2", "crop_size: 8 mirror: true")
    mirrored.forward([], mtop)
    flipped = np.zeros((3, 8, 8))
    flipped[:, 2:, :6] = 100  # the padding moves to the right
    seen = {bool((d == flipped).all()) for d in mtop[0].data}
    assert seen == {True, False}
    assert all((d == flipped).all() or (d == want).all() for d in mtop[0].data)


def test_window_square_mode_and_sampling(tmp_path: Path) -> None:
    wins = "# 0\nconst.png\n3 10 10\n2\n1 0.9 2 4 7 5\n0 0.1 0 0 3 3\n"
    layer, top = _window_layer(tmp_path, wins, 'batch_size: 4 fg_fraction: 0.5 '
                               'crop_mode: "square"', "crop_size: 6")
    layer.forward([], top)
    np.testing.assert_array_equal(top[1].data, [0, 0, 1, 1])  # background first
    # the 6x2 box made square (6x6, rows 1.5..7.5) fits the image: all pixels filled
    assert (top[0].data[2] == 100).all()


def test_window_state_and_errors(tmp_path: Path) -> None:
    wins = CONST + "# 1\nconst.png\n3 10 10\n1\n2 0.8 2 2 9 9\n"
    a, ta = _window_layer(tmp_path, wins, "batch_size: 3", "crop_size: 5 mirror: true")
    a.forward([], ta)
    state = a.get_state()
    want = []
    for _ in range(3):
        a.forward([], ta)
        want.append((ta[0].data.copy(), ta[1].data.copy()))
    b, tb = _window_layer(tmp_path, wins, "batch_size: 3", "crop_size: 5 mirror: true", seed=9)
    b.set_state(state)
    for d, lab in want:
        b.forward([], tb)
        np.testing.assert_array_equal(tb[0].data, d)
        np.testing.assert_array_equal(tb[1].data, lab)
    with pytest.raises(errors.NetError, match="crop_size > 0"):
        _window_layer(tmp_path, CONST, "batch_size: 1")
    with pytest.raises(errors.DataError, match="no background windows"):
        _window_layer(tmp_path, "# 0\nconst.png\n3 10 10\n1\n1 0.9 0 0 3 3\n",
                      "batch_size: 1", "crop_size: 4")
    with pytest.raises(errors.DataError, match=r"windows\.txt:5: a foreground window needs"):
        _window_layer(tmp_path, "# 0\nconst.png\n3 10 10\n2\n0 0.9 0 0 3 3\n0 0.1 0 0 3 3\n",
                      "batch_size: 1", "crop_size: 4")
    with pytest.raises(errors.DataError, match=r"windows\.txt:1: expected '#'"):
        _window_layer(tmp_path, "0\nconst.png\n", "batch_size: 1", "crop_size: 4")
    missing, mtop = _window_layer(tmp_path, CONST.replace("const.png", "gone.png"),
                                  "batch_size: 1", "crop_size: 4")
    with pytest.raises(errors.DataError, match=r"windows\.txt:2: could not load image"):
        missing.forward([], mtop)
