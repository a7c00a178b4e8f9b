"""Encoded Datums (JPEG/PNG bytes) in the Data layer and the dataset helpers.

Decoded as Caffe's OpenCV code does: BGR planes, gray files as one channel unless
transform_param.force_color / data_param.force_encoded_color ask for three, colour files as
one gray channel (OpenCV's weights) with force_gray.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from pycaffe_mpi import datasets, errors, registry
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.datasets import db as dbm
from pycaffe_mpi.datasets import images
from pycaffe_mpi.layer import TEST
from pycaffe_mpi.proto import caffe_pb2

RNG = np.random.default_rng(3)
BGR = RNG.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)   # 4 colour images, BGR planes
GRAY = RNG.integers(0, 256, (4, 1, 5, 6), dtype=np.uint8)


def png(img: np.ndarray, fmt: str = "PNG") -> bytes:
    """Image file bytes of a C x H x W BGR (or gray) array, as OpenCV's imencode writes."""
    arr = img[0] if img.shape[0] == 1 else img[::-1].transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, fmt)
    return buf.getvalue()


def cv_gray(bgr: np.ndarray) -> np.ndarray:
    b, g, r = (bgr[..., c, :, :].astype(np.int64) for c in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14).astype(np.uint8)


def write_db(path, raws, backend="lmdb", labels=None):
    with dbm.DatumWriter(path, backend) as w:
        for i, raw in enumerate(raws):
            d = caffe_pb2.Datum(data=raw, encoded=True, label=i if labels is None else labels[i])
            w.put(b"%08d" % i, d.SerializeToString())
    return str(path)


def make_layer(proto: str, ntop: int = 2):
    p = caffe_pb2.LayerParameter()
    text_format.Merge(proto, p)
    p.name, p.type = "data", "Data"
    layer = registry.layer_class("Data")(p, phase=TEST, dtype=np.float32,
                                         rng=np.random.default_rng(0))
    tops = [Blob((), np.float32) for _ in range(ntop)]
    layer.check_counts(0, ntop)
    layer.setup([], tops)
    layer.reshape([], tops)
    return layer, tops


def read(db: str, extra: str = "", batch: int = 4, backend: str = "LMDB") -> np.ndarray:
    layer, tops = make_layer(f'data_param {{ source: "{db}" batch_size: {batch} '
                             f"backend: {backend} {extra.partition('|')[0]} }} "
                             f"transform_param {{ {extra.partition('|')[2]} }}")
    layer.forward([], tops)
    out = tops[0].data.copy()
    layer.close()
    return out


def test_png_colour_decodes_to_bgr_planes(tmp_path):
    db = write_db(tmp_path / "c", [png(x) for x in BGR])
    np.testing.assert_array_equal(read(db), BGR)
    np.testing.assert_array_equal(read(db, "|force_color: true"), BGR)


def test_png_gray_is_one_channel_unless_forced(tmp_path):
    db = write_db(tmp_path / "g", [png(x) for x in GRAY], backend="leveldb")
    np.testing.assert_array_equal(read(db, backend="LEVELDB"), GRAY)
    three = np.repeat(GRAY, 3, axis=1)
    np.testing.assert_array_equal(read(db, "|force_color: true", backend="LEVELDB"), three)
    np.testing.assert_array_equal(read(db, "force_encoded_color: true", backend="LEVELDB"),
                                  three)
    # transform_param.force_gray wins over data_param.force_encoded_color
    np.testing.assert_array_equal(
        read(db, "force_encoded_color: true|force_gray: true", backend="LEVELDB"), GRAY)


def test_force_gray_uses_opencvs_weights(tmp_path):
    db = write_db(tmp_path / "c", [png(x) for x in BGR])
    np.testing.assert_array_equal(read(db, "|force_gray: true"), cv_gray(BGR)[:, None])


def test_jpeg_decodes_close_to_its_pixels(tmp_path):
    smooth = np.broadcast_to(np.linspace(40, 200, 16, dtype=np.uint8), (3, 16, 16)).copy()
    smooth[0] //= 2  # B plane differs, so a channel swap would show
    db = write_db(tmp_path / "j", [png(smooth, "JPEG")] * 2)
    got = read(db, batch=2)
    assert got.shape == (2, 3, 16, 16)
    assert np.abs(got[0] - smooth).max() <= 6
    gray = read(db, "|force_gray: true", batch=2)
    assert gray.shape == (2, 1, 16, 16)
    assert np.abs(gray[0, 0] - cv_gray(smooth[None])[0]).max() <= 6


def test_errors(tmp_path):
    db = write_db(tmp_path / "c", [png(x) for x in BGR])
    with pytest.raises(errors.NetError, match="both force_color and force_gray"):
        read(db, "|force_color: true force_gray: true")
    mixed = write_db(tmp_path / "m", [png(BGR[0]), png(GRAY[0]), png(BGR[1])])
    with pytest.raises(errors.DataError, match=r"record 1 of a batch decodes to shape"):
        read(mixed, batch=3)
    np.testing.assert_array_equal(read(mixed, "|force_color: true", batch=2)[1],
                                  np.repeat(GRAY[0], 3, axis=0))
    bad = write_db(tmp_path / "b", [b"not an image"])
    with pytest.raises(errors.DataError, match=r'layer "data".*could not decode'):
        read(bad, batch=1)
    late = write_db(tmp_path / "l", [png(BGR[0]), b"\x89PNG broken"])
    with pytest.raises(errors.DataError, match=r'layer "data".*reading.*could not decode'):
        read(late, batch=2)


def test_raw_datums_ignore_force_flags_with_a_warning(tmp_path, caplog):
    datasets.write_datum_lmdb(tmp_path / "r", BGR, np.arange(4))
    np.testing.assert_array_equal(read(str(tmp_path / "r"), "|force_gray: true"), BGR)
    assert "only apply to encoded" in caplog.text


def test_mean_and_helpers_decode_encoded_records(tmp_path):
    db = write_db(tmp_path / "c", [png(x) for x in BGR], backend="leveldb")
    mean = datasets.compute_image_mean(db)
    np.testing.assert_allclose(mean[0], BGR.mean(axis=0, dtype=np.float64), rtol=1e-6)
    first = datasets.first_datum(db)
    assert first.encoded
    np.testing.assert_array_equal(images.decode_datum(first), BGR[0])
    np.testing.assert_array_equal(pio.datum_to_array(first), BGR[0])
    np.testing.assert_array_equal(images.decode_image(png(GRAY[0]), True),
                                  np.repeat(GRAY[0], 3, axis=0))


def test_sixteen_bit_and_alpha_pngs(tmp_path):
    deep = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, "PNG")  # mode I;16: 16-bit gray
    np.testing.assert_array_equal(images.decode_image(buf.getvalue())[0], deep >> 8)
    rgba = np.dstack([BGR[0][::-1].transpose(1, 2, 0), np.full((5, 6), 7, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    np.testing.assert_array_equal(images.decode_image(buf.getvalue()), BGR[0])
