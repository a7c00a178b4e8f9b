"""Audit of issue 8: ``caffe.io`` helpers against pycaffe's documented behaviour (its
python/caffe/io.py), with plain references written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pycaffe_mpi as caffe
from pycaffe_mpi import errors
from pycaffe_mpi.proto import caffe_pb2


def _oversample_reference(images: list[np.ndarray], crop: tuple[int, int]) -> np.ndarray:
    h, w = images[0].shape[:2]
    boxes = [(0, 0), (0, w - crop[1]), (h - crop[0], 0), (h - crop[0], w - crop[1]),
             (int(h / 2 - crop[0] / 2), int(w / 2 - crop[1] / 2))]
    out = []
    for im in images:
        five = [im[t:t + crop[0], left:left + crop[1]] for t, left in boxes]
        out += five + [c[:, ::-1] for c in five]
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(("size", "crop"), [((7, 9), (4, 5)), ((6, 6), (3, 3)), ((5, 8), (5, 2))])
def test_oversample_is_pycaffes_ten_crops(size: tuple[int, int], crop: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((*size, 3)) for _ in range(2)]
    got = caffe.io.oversample(images, crop)
    assert got.shape == (20, *crop, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, _oversample_reference(images, crop))


def test_blobproto_legacy_and_nd_shapes() -> None:
    legacy = caffe_pb2.BlobProto(num=2, channels=1, height=1, width=3, data=range(6))
    assert caffe.io.blobproto_to_array(legacy).shape == (2, 1, 1, 3)
    arr = np.arange(6, dtype=np.float32).reshape(3, 2)
    diff = -arr
    blob = caffe.io.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [3, 2] and not blob.HasField("num")
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), diff)


def test_blobprotovector_string() -> None:
    arrays = [np.ones((1, 2)), np.arange(3.0)]
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(caffe.io.arraylist_to_blobprotovector_str(arrays))
    assert [list(b.shape.dim) for b in vec.blobs] == [[1, 2], [3]]
    back = [caffe.io.blobproto_to_array(b) for b in vec.blobs]
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)


def test_datum_round_trip_uint8_and_float() -> None:
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    datum = caffe.io.array_to_datum(u8, label=3)
    assert (datum.channels, datum.height, datum.width, datum.label) == (2, 3, 4, 3)
    assert datum.data == u8.tobytes() and not datum.float_data
    back = caffe.io.datum_to_array(datum)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, u8)
    f = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    datum = caffe.io.array_to_datum(f)
    assert not datum.data and len(datum.float_data) == 24
    np.testing.assert_allclose(caffe.io.datum_to_array(datum), f, rtol=1e-6)
    # NOTE: pycaffe raises ValueError here; ours is a DataError (a PycaffeError), as every
    # user-input error of the project
    with pytest.raises((ValueError, errors.PycaffeError)):
        caffe.io.array_to_datum(np.zeros((2, 2)))


def test_load_image_is_unit_float_hwc(tmp_path: Path) -> None:
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.full((3, 4), 51, np.uint8)).save(tmp_path / "g.png")
    c = caffe.io.load_image(str(tmp_path / "c.png"))
    assert c.shape == (3, 4, 3) and c.dtype == np.float32
    np.testing.assert_allclose(c[0, 0], [1, 0, 0])
    g = caffe.io.load_image(str(tmp_path / "g.png"))
    assert g.shape == (3, 4, 3)
    np.testing.assert_allclose(g, 0.2, atol=1e-6)
    assert caffe.io.load_image(str(tmp_path / "g.png"), color=False).shape == (3, 4, 1)


def test_resize_image_shape_and_constant() -> None:
    im = np.full((5, 7, 2), 3.5, np.float32)
    out = caffe.io.resize_image(im, (10, 3))
    assert out.shape == (10, 3, 2)
    np.testing.assert_array_equal(out, 3.5)
    ramp = np.arange(4, dtype=np.float32)[None, :, None].repeat(2, 0)
    up = caffe.io.resize_image(ramp, (2, 8))
    assert up.shape == (2, 8, 1)
    assert np.all(np.diff(up[0, :, 0]) >= 0)  # bilinear keeps a ramp monotone
