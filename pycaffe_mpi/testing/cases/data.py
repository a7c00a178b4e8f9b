"""Layer cases for the data family: Input, DummyData, Data.

None has a gradient (grad=False) or bottoms. The Data cases read tiny databases of 5 Datum
records (3×4×5 uint8) written with plain ``lmdb`` / ``plyvel`` calls into a temporary directory
when this module is imported (removed at exit): raw records in an LMDB and in a LevelDB, and
the same pixels as encoded PNG files (written by Pillow, BGR planes stored as an RGB image, as
OpenCV writes them) in a LevelDB; their references transform the known pixels with loops.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np

from pycaffe_mpi.layer import TEST
from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

# -- Input -------------------------------------------------------------------------------------


def _zeros(*shapes):
    def ref(bottoms, layer):
        return [np.zeros(s) for s in shapes]  # Input leaves its tops as they are (zeros)
    return ref


add_case(LayerCase(
    type="Input", id="shape_per_top", ntop=2, grad=False, reshape=(),
    proto="input_param { shape { dim: 2 dim: 3 } shape { dim: 4 dim: 1 dim: 2 } }",
    reference=_zeros((2, 3), (4, 1, 2))))
add_case(LayerCase(
    type="Input", id="one_shape_for_all", ntop=2, grad=False, reshape=(),
    proto="input_param { shape { dim: 2 dim: 3 dim: 2 } }",
    reference=_zeros((2, 3, 2), (2, 3, 2))))

# -- DummyData ---------------------------------------------------------------------------------

add_case(LayerCase(
    type="DummyData", id="default_zero", ntop=3, grad=False, reshape=(),
    proto="dummy_data_param { shape { dim: 2 dim: 3 } }",
    reference=_zeros((2, 3), (2, 3), (2, 3))))

add_case(LayerCase(
    type="DummyData", id="legacy_constants", ntop=2, grad=False, reshape=(),
    proto=("dummy_data_param { num: 2 num: 1 channels: 3 height: 2 height: 1 width: 1 "
           'data_filler { type: "constant" value: 1.5 } '
           'data_filler { type: "constant" value: -2 } }'),
    reference=lambda b, layer: [np.full((2, 3, 2, 1), 1.5), np.full((1, 3, 1, 1), -2.0)]))


def _dummy_uniform_ref(bottoms, layer):
    # the case is stochastic: layer.rng is reseeded with 7 before forward; the constant top
    # was filled in setup, the uniform ones are drawn in top order on forward
    rng = np.random.default_rng(7)
    return [np.full((2, 3), 0.25), rng.uniform(-1.0, 2.0, (2, 3)), rng.uniform(0.0, 1.0, (2, 3))]


add_case(LayerCase(
    type="DummyData", id="refill_random", ntop=3, grad=False, reshape=(), stochastic=True,
    proto=('dummy_data_param { shape { dim: 2 dim: 3 } '
           'data_filler { type: "constant" value: 0.25 } '
           'data_filler { type: "uniform" min: -1 max: 2 } '
           'data_filler { type: "uniform" } }'),
    reference=_dummy_uniform_ref))

# -- Data --------------------------------------------------------------------------------------

_DIR = tempfile.mkdtemp(prefix="pycaffe-data-case-")
atexit.register(shutil.rmtree, _DIR, True)
_PIX = np.random.default_rng(11).integers(0, 256, (5, 3, 4, 5)).astype(np.uint8)
_LABELS = [3, 1, 4, 1, 5]
_DB = os.path.join(_DIR, "tiny_lmdb")
_MEAN = os.path.join(_DIR, "mean.binaryproto")
_MEAN_ARR = np.random.default_rng(12).uniform(0, 255, (1, 3, 4, 5)).astype(np.float32)


def _write_tiny_db() -> None:
    import lmdb

    from pycaffe_mpi.proto import caffe_pb2

    env = lmdb.open(_DB, map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(_PIX, _LABELS)):
            d = caffe_pb2.Datum(channels=3, height=4, width=5, data=img.tobytes(), label=lab)
            txn.put(b"%05d" % i, d.SerializeToString())
    env.close()
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=4, width=5)
    blob.data.extend(_MEAN_ARR.ravel().tolist())
    with open(_MEAN, "wb") as f:
        f.write(blob.SerializeToString())


_write_tiny_db()

_LEVELDB = os.path.join(_DIR, "tiny_leveldb")
_PNG_LEVELDB = os.path.join(_DIR, "png_leveldb")


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[::-1].transpose(1, 2, 0))).save(buf, "PNG")
    return buf.getvalue()


def _write_leveldbs() -> None:
    import plyvel

    from pycaffe_mpi.proto import caffe_pb2

    raw = plyvel.DB(_LEVELDB, create_if_missing=True)
    png = plyvel.DB(_PNG_LEVELDB, create_if_missing=True)
    for i, (img, lab) in enumerate(zip(_PIX, _LABELS)):
        d = caffe_pb2.Datum(channels=3, height=4, width=5, data=img.tobytes(), label=lab)
        raw.put(b"%08d" % i, d.SerializeToString())
        # as convert_imageset --encoded writes them: no channels/height/width
        e = caffe_pb2.Datum(data=_png(img), label=lab, encoded=True)
        png.put(b"%08d_img%d.png" % (i, i), e.SerializeToString())
    raw.close()
    png.close()


_write_leveldbs()


def _data_ref(batch, crop, mean_value=None, mean_file=False, scale=1.0, labels=True):
    def ref(bottoms, layer):
        c, h, w = 3, 4, 5
        oh, ow = (crop, crop) if crop else (h, w)
        h_off, w_off = (h - oh) // 2, (w - ow) // 2  # TEST phase: centred crop
        out = np.zeros((batch, c, oh, ow))
        for n in range(batch):
            img = _PIX[n % len(_PIX)]
            for ch in range(c):
                for y in range(oh):
                    for x in range(ow):
                        v = float(img[ch, y + h_off, x + w_off])
                        if mean_file:
                            v -= float(_MEAN_ARR[0, ch, y + h_off, x + w_off])
                        elif mean_value is not None:
                            v -= mean_value[ch] if len(mean_value) > 1 else mean_value[0]
                        out[n, ch, y, x] = v * scale
        tops = [out]
        if labels:
            tops.append(np.array([_LABELS[n % len(_LABELS)] for n in range(batch)], float))
        return tops
    return ref


add_case(LayerCase(
    type="Data", id="crop_mean_value_scale", ntop=2, grad=False, reshape=(), phase=TEST,
    proto=(f'data_param {{ source: "{_DB}" batch_size: 3 backend: LMDB }} '
           "transform_param { crop_size: 3 mean_value: 100 mean_value: 120 mean_value: 90 "
           "scale: 0.5 }"),
    reference=_data_ref(3, 3, mean_value=[100.0, 120.0, 90.0], scale=0.5), rtol=1e-6))

add_case(LayerCase(
    type="Data", id="mean_file_wraps_no_label", ntop=1, grad=False, reshape=(), phase=TEST,
    proto=(f'data_param {{ source: "{_DB}" batch_size: 7 backend: LMDB }} '
           f'transform_param {{ mean_file: "{_MEAN}" scale: 0.25 }}'),
    reference=_data_ref(7, 0, mean_file=True, scale=0.25, labels=False), rtol=1e-6))

add_case(LayerCase(
    type="Data", id="one_mean_value_crop", ntop=2, grad=False, reshape=(), phase=TEST,
    proto=(f'data_param {{ source: "{_DB}" batch_size: 2 backend: LMDB }} '
           "transform_param { crop_size: 2 mean_value: 128 }"),
    reference=_data_ref(2, 2, mean_value=[128.0])))

add_case(LayerCase(
    type="Data", id="leveldb_default_backend", ntop=2, grad=False, reshape=(), phase=TEST,
    proto=(f'data_param {{ source: "{_LEVELDB}" batch_size: 6 }} '
           "transform_param { crop_size: 3 mean_value: 100 mean_value: 120 mean_value: 90 }"),
    reference=_data_ref(6, 3, mean_value=[100.0, 120.0, 90.0])))

add_case(LayerCase(
    type="Data", id="encoded_png_leveldb", ntop=2, grad=False, reshape=(), phase=TEST,
    proto=(f'data_param {{ source: "{_PNG_LEVELDB}" batch_size: 3 backend: LEVELDB }} '
           "transform_param { scale: 0.5 mean_value: 10 }"),
    reference=_data_ref(3, 0, mean_value=[10.0], scale=0.5), rtol=1e-6))


def _gray_ref(batch):
    def ref(bottoms, layer):
        out = np.zeros((batch, 1, 4, 5))
        for n in range(batch):
            b, g, r = (_PIX[n % len(_PIX)][ch].astype(np.int64) for ch in range(3))
            for y in range(4):
                for x in range(5):
                    # OpenCV's BGR -> gray: 14-bit fixed-point weights, rounded
                    out[n, 0, y, x] = (r[y, x] * 4899 + g[y, x] * 9617 + b[y, x] * 1868
                                       + 8192) >> 14
        return [out, np.array([_LABELS[n % len(_LABELS)] for n in range(batch)], float)]
    return ref


add_case(LayerCase(
    type="Data", id="encoded_png_force_gray", ntop=2, grad=False, reshape=(), phase=TEST,
    proto=(f'data_param {{ source: "{_PNG_LEVELDB}" batch_size: 4 backend: LEVELDB }} '
           "transform_param { force_gray: true }"),
    reference=_gray_ref(4)))
