"""caffe.io: Transformer (pycaffe's order of operations), load_image, resize_image, oversample and
the blob/datum conversions, against values worked out by hand from pycaffe's io.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pycaffe_mpi as caffe
from pycaffe_mpi import errors, snapshot
from pycaffe_mpi import io as caffe_io


def test_io_is_the_package_attribute_and_reexports_conversions():
    assert caffe.io is caffe_io
    for name in ("blobproto_to_array", "array_to_blobproto", "array_to_datum",
                 "datum_to_array", "arraylist_to_blobprotovector_str",
                 "blobprotovector_str_to_arraylist"):
        assert getattr(caffe.io, name) is getattr(snapshot, name)
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(caffe.io.array_to_blobproto(arr)),
                                  arr)
    datum = caffe.io.array_to_datum(arr.astype(np.uint8), label=3)
    assert datum.label == 3 and datum.channels == 2
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), arr)
    raw = caffe.io.arraylist_to_blobprotovector_str([arr, arr[0]])
    back = caffe.io.blobprotovector_str_to_arraylist(raw)
    assert [a.shape for a in back] == [(2, 3, 4), (3, 4)]


def reference_preprocess(img, raw_scale, mean, input_scale):
    """pycaffe's steps written out: transpose (2,0,1), swap (2,1,0), raw, mean, input."""
    h, w, k = img.shape
    out = np.zeros((k, h, w))
    for c in range(k):
        for y in range(h):
            for x in range(w):
                v = img[y, x, 2 - c] * raw_scale
                v -= mean[c]
                out[c, y, x] = v * input_scale
    return out


def test_transformer_order_of_operations_and_inverse():
    rng = np.random.default_rng(0)
    img = rng.random((4, 5, 3)).astype(np.float32)
    tf = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    tf.set_transpose("data", (2, 0, 1))
    tf.set_channel_swap("data", (2, 1, 0))
    tf.set_raw_scale("data", 255.0)
    tf.set_mean("data", np.array([10.0, 20.0, 30.0]))
    tf.set_input_scale("data", 0.5)
    out = tf.preprocess("data", img)
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, reference_preprocess(img, 255.0, [10, 20, 30], 0.5),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(tf.deprocess("data", out[np.newaxis]), img, atol=1e-5)
    before = img.copy()
    tf.preprocess("data", img)
    np.testing.assert_array_equal(img, before)  # the caller's image is left alone


def test_transformer_resizes_to_the_input_and_takes_elementwise_means():
    tf = caffe.io.Transformer({"data": (2, 1, 4, 4)})
    tf.set_transpose("data", (2, 0, 1))
    img = np.full((8, 8, 1), 0.25, dtype=np.float32)
    assert tf.preprocess("data", img).shape == (1, 4, 4)
    mean = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    tf.set_mean("data", mean)
    np.testing.assert_allclose(tf.preprocess("data", img), 0.25 - mean)
    tf.set_mean("data", mean[0])  # H x W: one channel, kept as given (it broadcasts)
    np.testing.assert_allclose(tf.preprocess("data", img), 0.25 - mean)
    big = np.arange(64, dtype=np.float64).reshape(1, 8, 8)  # resized like an image, range kept
    tf.set_mean("data", big)
    assert tf.mean["data"].shape == (1, 4, 4)
    assert big.min() <= tf.mean["data"].min() < tf.mean["data"].max() <= big.max()


def test_transformer_checks_like_pycaffe():
    tf = caffe.io.Transformer({"data": (1, 3, 4, 4)})
    with pytest.raises(errors.PycaffeError, match="not one of the net inputs"):
        tf.preprocess("image", np.zeros((4, 4, 3)))
    with pytest.raises(errors.PycaffeError, match="Transpose order"):
        tf.set_transpose("data", (1, 0))
    with pytest.raises(errors.PycaffeError, match="Channel swap"):
        tf.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="Mean channels incompatible"):
        tf.set_mean("data", np.zeros(2))
    with pytest.raises(ValueError, match="Mean shape invalid"):
        tf.set_mean("data", np.zeros((1, 1, 2, 2)))


def test_load_image_color_gray_alpha_and_16_bit(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (0, 51, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    im = caffe.io.load_image(str(tmp_path / "rgb.png"))
    assert im.dtype == np.float32 and im.shape == (2, 3, 3)
    np.testing.assert_allclose(im, rgb / 255.0, atol=1e-7)
    gray = caffe.io.load_image(str(tmp_path / "rgb.png"), color=False)
    assert gray.shape == (2, 3, 1)
    # skimage's rgb2gray weights, as pycaffe's as_grey read
    np.testing.assert_allclose(gray[1, 2, 0], (0.7154 * 51 + 0.0721 * 255) / 255, atol=1e-6)
    np.testing.assert_allclose(gray[0, 0, 0], 0.2125, atol=1e-6)

    lum = np.array([[0, 128], [255, 64]], dtype=np.uint8)
    Image.fromarray(lum).save(tmp_path / "gray.png")
    g = caffe.io.load_image(str(tmp_path / "gray.png"), color=False)
    assert g.shape == (2, 2, 1)
    np.testing.assert_allclose(g[..., 0], lum / 255.0, atol=1e-7)
    g3 = caffe.io.load_image(str(tmp_path / "gray.png"))  # gray read in color: 3 copies
    assert g3.shape == (2, 2, 3) and (g3 == g).all()

    rgba = np.dstack([rgb, np.full((2, 3), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "rgba.png")), im)

    deep = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    d = caffe.io.load_image(str(tmp_path / "deep.png"), color=False)
    np.testing.assert_allclose(d[..., 0], deep / 65535.0, atol=1e-6)


def test_resize_image():
    im = np.array([[0.0, 1.0], [2.0, 3.0]])[:, :, np.newaxis]
    up = caffe.io.resize_image(im, (4, 4))
    assert up.shape == (4, 4, 1) and up.dtype == np.float32
    # bilinear between pixel centres; outside them the edge value
    np.testing.assert_allclose(up[0, :, 0], [0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(up[:, 0, 0], [0, 0.5, 1.5, 2.0])
    near = caffe.io.resize_image(im, (4, 4), interp_order=0)
    np.testing.assert_array_equal(near[:, :, 0], np.kron([[0, 1], [2, 3]], np.ones((2, 2))))
    many = np.random.default_rng(1).random((5, 6, 7))  # any channel count
    np.testing.assert_allclose(caffe.io.resize_image(many, (5, 6)), many, rtol=1e-6)
    down = caffe.io.resize_image(np.kron([[0.0, 4.0]], np.ones((2, 2)))[..., None], (1, 2))
    np.testing.assert_allclose(down[..., 0], [[0.0, 4.0]])
    flat = caffe.io.resize_image(np.full((3, 3, 3), 5.0), (2, 7))
    assert flat.shape == (2, 7, 3) and (flat == 5).all()


def test_oversample_gives_corners_centre_and_mirrors():
    im = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
    crops = caffe.io.oversample([im, im + 100], (3, 4))
    assert crops.shape == (20, 3, 4, 2) and crops.dtype == np.float32
    boxes = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]  # centre: int(2.5-1.5), int(3-2)
    for i, (y, x) in enumerate(boxes):
        np.testing.assert_array_equal(crops[i], im[y:y + 3, x:x + 4])
        np.testing.assert_array_equal(crops[5 + i], im[y:y + 3, x:x + 4][:, ::-1])
        np.testing.assert_array_equal(crops[10 + i], im[y:y + 3, x:x + 4] + 100)
