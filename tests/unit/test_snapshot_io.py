"""pycaffe_mpi.snapshot: BlobProto / Datum conversion, binaryproto files, atomic writes."""

from __future__ import annotations

import io as _io
import os

import numpy as np
import pytest

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.proto import caffe_pb2


def test_blobproto_roundtrip_shape():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5
    blob = pio.array_to_blobproto(a)
    assert list(blob.shape.dim) == [2, 3, 4]
    assert blob.num == 0 and not blob.HasField("num")
    out = pio.blobproto_to_array(blob)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)


def test_fast_packing_serialises_like_plain_extend():
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    d = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    plain = caffe_pb2.BlobProto()
    plain.shape.dim.extend([3, 5])
    plain.data.extend(a.ravel().tolist())
    plain.diff.extend(d.ravel().tolist())
    fast = pio.array_to_blobproto(a, diff=d)
    assert fast.SerializeToString() == plain.SerializeToString()
    np.testing.assert_array_equal(pio.blobproto_to_array(fast, return_diff=True), d)


def test_big_blob_roundtrip():
    a = np.random.default_rng(0).standard_normal(300_000).astype(np.float32).reshape(300, 1000)
    blob = caffe_pb2.BlobProto.FromString(pio.array_to_blobproto(a).SerializeToString())
    np.testing.assert_array_equal(pio.blobproto_to_array(blob), a)


def test_legacy_dims_read_and_write():
    blob = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3)
    blob.data.extend([1, 2, 3, 4, 5, 6])
    out = pio.blobproto_to_array(blob)
    assert out.shape == (1, 2, 1, 3)
    np.testing.assert_array_equal(out.ravel(), [1, 2, 3, 4, 5, 6])
    w = pio.array_to_blobproto(np.ones((2, 3, 4)), legacy=True)
    assert not w.HasField("shape")
    assert (w.num, w.channels, w.height, w.width) == (1, 2, 3, 4)
    with pytest.raises(errors.DataError):
        pio.array_to_blobproto(np.ones((1, 1, 1, 1, 2)), legacy=True)


def test_double_data_takes_priority():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2])
    blob.double_data.extend([0.1, 0.2])
    out = pio.blobproto_to_array(blob)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.1, 0.2])


def test_count_mismatch_is_data_error():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2, 2])
    blob.data.extend([1, 2, 3])
    with pytest.raises(errors.DataError, match="3 data values, expected 4"):
        pio.blobproto_to_array(blob)


def test_binaryproto_file_roundtrip(tmp_path):
    p = tmp_path / "mean.binaryproto"
    a = np.random.default_rng(0).uniform(0, 255, (1, 3, 4, 4)).astype(np.float32)
    pio.write_binaryproto(p, a, legacy=True)
    np.testing.assert_array_equal(pio.read_binaryproto(p), a)
    blob = pio.read_proto_binary(p, caffe_pb2.BlobProto())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 4, 4)
    assert sorted(os.listdir(tmp_path)) == ["mean.binaryproto"]  # no temporary left behind


def test_missing_and_garbled_files_name_the_path(tmp_path):
    with pytest.raises(errors.DataError, match=r"nope\.binaryproto"):
        pio.read_binaryproto(tmp_path / "nope.binaryproto")
    bad = tmp_path / "bad.binaryproto"
    bad.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(errors.DataError, match=r"bad\.binaryproto"):
        pio.read_binaryproto(bad)
    with pytest.raises(errors.DataError, match=r"bad\.binaryproto"):
        pio.read_proto_binary(bad, caffe_pb2.NetParameter())


def test_proto_binary_roundtrip(tmp_path):
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="ip", type="InnerProduct")
    layer.blobs.append(pio.array_to_blobproto(np.eye(3)))
    p = tmp_path / "m.caffemodel"
    pio.write_proto_binary(p, net)
    back = pio.read_proto_binary(p, caffe_pb2.NetParameter())
    assert back == net
    np.testing.assert_array_equal(pio.blobproto_to_array(back.layer[0].blobs[0]), np.eye(3))


def test_atomic_write_replaces_and_never_half_writes(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    pio.atomic_write(p, b"old")
    pio.atomic_write(p, b"new contents")
    assert p.read_bytes() == b"new contents"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        pio.atomic_write(p, b"x" * 1000)
    assert p.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_honours_umask(tmp_path):
    old = os.umask(0o022)
    try:
        pio.atomic_write(tmp_path / "f", b"1")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_datum_uint8_and_float():
    img = np.random.default_rng(0).integers(0, 256, (3, 2, 4)).astype(np.uint8)
    d = pio.array_to_datum(img, label=7)
    assert (d.channels, d.height, d.width, d.label) == (3, 2, 4, 7)
    assert d.data == img.tobytes() and not len(d.float_data)
    back = pio.datum_to_array(caffe_pb2.Datum.FromString(d.SerializeToString()))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, img)

    f = np.linspace(-1, 1, 6).reshape(1, 2, 3)
    d = pio.array_to_datum(f)
    assert not d.HasField("label") and not d.data and len(d.float_data) == 6
    np.testing.assert_allclose(pio.datum_to_array(d), f, rtol=1e-6)
    with pytest.raises(errors.DataError, match="C x H x W"):
        pio.array_to_datum(np.zeros((2, 2)))


def test_encoded_datum_decodes_to_bgr():
    pil = pytest.importorskip("PIL.Image")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10   # blue
    buf = _io.BytesIO()
    pil.fromarray(rgb).save(buf, format="PNG")
    d = caffe_pb2.Datum(data=buf.getvalue(), encoded=True, label=1)
    arr = pio.datum_to_array(d)
    assert arr.shape == (3, 2, 3)
    assert (arr[0] == 10).all() and (arr[1] == 0).all() and (arr[2] == 200).all()


def test_blobprotovector_roundtrip():
    arrs = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 2, 2, 1), np.float32)]
    back = pio.blobprotovector_str_to_arraylist(pio.arraylist_to_blobprotovector_str(arrs))
    assert len(back) == 2
    for a, b in zip(arrs, back):
        np.testing.assert_array_equal(a, b)
