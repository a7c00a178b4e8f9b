"""The data layers: Data (LMDB, transform_param, prefetch, bootstrap), Input, DummyData."""

from __future__ import annotations

import logging

import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import datasets, errors, registry
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.layer_types import data as data_layers
from pycaffe_mpi.proto import caffe_pb2


def make_db(path, images, labels=None):
    images = np.asarray(images, dtype=np.uint8)
    labels = np.arange(len(images)) if labels is None else np.asarray(labels)
    datasets.write_datum_lmdb(path, images, labels)
    return str(path)


def make_layer(proto, phase=TEST, ntop=2, seed=1701, dtype=np.float32, type_="Data"):
    p = caffe_pb2.LayerParameter()
    text_format.Merge(proto, p)
    p.name, p.type = "data", type_
    layer = registry.layer_class(type_)(p, phase=phase, dtype=dtype,
                                        rng=np.random.default_rng(seed))
    tops = [Blob((), dtype) for _ in range(ntop)]
    layer.check_counts(0, ntop)
    layer.setup([], tops)
    layer.reshape([], tops)
    return layer, tops


def batches(layer, tops, n):
    out = []
    for _ in range(n):
        layer.forward([], tops)
        out.append(tuple(np.array(t.data, copy=True) for t in tops))
    return out


@pytest.fixture
def ramp_db(tmp_path):
    """5 records of 1x3x4 (values 100*i + 0..11), labels 0..4."""
    imgs = (np.arange(12).reshape(1, 1, 3, 4) + 100 * np.arange(5).reshape(5, 1, 1, 1))
    return make_db(tmp_path / "ramp_lmdb", imgs % 256)


class FlipAll:
    """A Generator stand-in that mirrors every example (integers -> ones)."""

    def integers(self, low, high=None, size=None):
        return np.ones(size, dtype=np.int64)


def test_transform_order_hand_computed():
    # one 1x3x4 image x = 0..11; crop 2 (TEST: centred, rows 0-1, cols 1-2) -> [[1,2],[5,6]];
    # mirror -> [[2,1],[6,5]]; mean_file m[y, x] = 10*y + x at the *source* positions
    # (y, x) = (0,2),(0,1),(1,2),(1,1) -> [[2,1],[12,11]]; scale 2 -> [[0,0],[-12,-12]].
    tp = caffe_pb2.TransformationParameter(crop_size=2, mirror=True, scale=2.0)
    t = data_layers.DataTransformer(caffe_pb2.LayerParameter(name="t"), tp, TEST)
    assert t.setup((1, 3, 4), np.float64) == (1, 2, 2)
    t.mean_file = "given"  # as if read from a mean file:
    t.mean = (10.0 * np.arange(3)[:, None] + np.arange(4)).reshape(1, 3, 4)
    x = np.arange(12, dtype=np.uint8).reshape(1, 1, 3, 4)
    out = t(x, FlipAll(), np.float64)
    np.testing.assert_array_equal(out[0, 0], [[0.0, 0.0], [-12.0, -12.0]])


def test_transform_mean_value_then_scale(ramp_db):
    layer, (data, label) = make_layer(
        f'data_param {{ source: "{ramp_db}" batch_size: 2 backend: LMDB }} '
        "transform_param { crop_size: 2 mean_value: 3 scale: 0.5 }")
    layer.forward([], [data, label])
    # record 0 centred crop rows (3-2)//2 = 0.., cols (4-2)//2 = 1..: [[1,2],[5,6]]
    np.testing.assert_array_equal(data.data[0, 0], (np.array([[1, 2], [5, 6]]) - 3) * 0.5)
    np.testing.assert_array_equal(data.data[1, 0], (np.array([[101, 102], [105, 106]]) - 3) * 0.5)
    np.testing.assert_array_equal(label.data, [0, 1])
    assert data.data.dtype == np.float32 and data.shape == (2, 1, 2, 2)
    layer.close()


def _crops(img, k):
    """Every crop (and its mirror) of a C x H x W image."""
    _, h, w = img.shape
    out = []
    for y in range(h - k + 1):
        for x in range(w - k + 1):
            crop = img[:, y:y + k, x:x + k]
            out += [crop, crop[:, :, ::-1]]
    return out


def test_train_random_crop_and_mirror(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 2, 6, 6))
    db = make_db(tmp_path / "db", imgs)
    proto = (f'data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} '
             "transform_param { crop_size: 3 mirror: true }")
    layer, tops = make_layer(proto, phase=TRAIN, seed=5)
    run = batches(layer, tops, 12)  # the 4 records every batch
    layer.close()
    seen = set()
    for data, labels in run:
        np.testing.assert_array_equal(labels, [0, 1, 2, 3])
        for n in range(4):
            matches = [i for i, c in enumerate(_crops(imgs[n], 3)) if np.array_equal(c, data[n])]
            assert matches, "output is not a crop/mirror of its record"
            seen.add((n, matches[0]))
    # varied across batches: many distinct crop/mirror choices, both mirror states
    assert len(seen) > 20
    assert {i % 2 for _, i in seen} == {0, 1}
    # reproducible per seed, different for another seed
    again, tops2 = make_layer(proto, phase=TRAIN, seed=5)
    for (a, _), (b, _) in zip(run, batches(again, tops2, 12)):
        np.testing.assert_array_equal(a, b)
    again.close()
    other, tops3 = make_layer(proto, phase=TRAIN, seed=6)
    assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(run, batches(other, tops3, 12)))
    other.close()


def test_test_phase_crop_is_centred_and_mirror_still_random(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (2, 1, 5, 5))
    db = make_db(tmp_path / "db", imgs)
    layer, tops = make_layer(f'data_param {{ source: "{db}" batch_size: 2 backend: LMDB }} '
                             "transform_param { crop_size: 3 mirror: true }", phase=TEST)
    flips = set()
    for data, _ in batches(layer, tops, 10):
        for n in range(2):
            centre = imgs[n, :, 1:4, 1:4]
            if np.array_equal(data[n], centre):
                flips.add(False)
            else:
                np.testing.assert_array_equal(data[n], centre[:, :, ::-1])
                flips.add(True)
    assert flips == {False, True}
    layer.close()


def test_mean_file(tmp_path):
    imgs = np.random.default_rng(2).integers(0, 256, (3, 3, 4, 4))
    db = make_db(tmp_path / "db", imgs)
    mean = np.random.default_rng(3).uniform(0, 255, (1, 3, 4, 4)).astype(np.float32)
    mean_path = tmp_path / "mean.binaryproto"
    pio.write_binaryproto(mean_path, mean, legacy=True)
    layer, (data, label) = make_layer(
        f'data_param {{ source: "{db}" batch_size: 3 backend: LMDB }} '
        f'transform_param {{ mean_file: "{mean_path}" scale: 0.1 }}', dtype=np.float64)
    layer.forward([], [data, label])
    want = (imgs.astype(np.float64) - mean.astype(np.float64)) * np.float64(np.float32(0.1))
    np.testing.assert_allclose(data.data, want, rtol=1e-12)
    layer.close()


def test_mean_file_shape_mismatch_and_missing(tmp_path, ramp_db):
    pio.write_binaryproto(tmp_path / "m.binaryproto", np.zeros((1, 3, 4, 4)), legacy=True)
    with pytest.raises(errors.NetError, match="mean_file"):
        make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 1 backend: LMDB }} '
                   f'transform_param {{ mean_file: "{tmp_path / "m.binaryproto"}" }}')
    with pytest.raises(errors.DataError, match=r"mean_file.*does not exist"):
        make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 1 backend: LMDB }} '
                   f'transform_param {{ mean_file: "{tmp_path / "none.binaryproto"}" }}')


def test_wrap_around_and_exact_sequence(ramp_db):
    layer, tops = make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 3 backend: LMDB }}')
    got = batches(layer, tops, 4)
    want = [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    for (data, labels), w in zip(got, want):
        np.testing.assert_array_equal(labels, w)
        np.testing.assert_array_equal(data[:, 0, 0, 0], [(100 * i) % 256 for i in w])
    layer.close()


def test_prefetch_thread_delivers_db_order_and_close_stops_it(tmp_path):
    imgs = np.random.default_rng(4).integers(0, 256, (37, 1, 2, 2))
    db = make_db(tmp_path / "db", imgs)
    layer, tops = make_layer(f'data_param {{ source: "{db}" batch_size: 8 backend: LMDB '
                             "prefetch: 2 }")
    thread = layer._prefetcher.thread
    assert thread.is_alive() and thread.daemon
    got = batches(layer, tops, 10)  # 80 records: more than two passes
    seq = np.concatenate([d for d, _ in got])
    idx = np.arange(80) % 37
    np.testing.assert_array_equal(seq, imgs[idx])
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in got]), idx)
    layer.close()
    assert not thread.is_alive()
    layer.close()  # idempotent
    with pytest.raises(errors.DataError, match="closed"):
        layer.forward([], tops)


def test_dropped_layer_stops_its_thread(ramp_db):
    import gc

    layer, _ = make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 2 backend: LMDB }}')
    thread = layer._prefetcher.thread
    del layer
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_rand_skip_reproducible(tmp_path):
    db = make_db(tmp_path / "db", np.zeros((50, 1, 1, 1)))
    firsts = []
    for seed in range(12):
        layer, tops = make_layer(f'data_param {{ source: "{db}" batch_size: 1 backend: LMDB '
                                 "rand_skip: 40 }", seed=seed)
        layer.forward([], tops)
        firsts.append(int(tops[1].data[0]))
        layer.forward([], tops)
        assert int(tops[1].data[0]) == (firsts[-1] + 1) % 50
        layer.close()
    assert all(0 <= f < 40 for f in firsts) and len(set(firsts)) > 3
    layer, tops = make_layer(f'data_param {{ source: "{db}" batch_size: 1 backend: LMDB '
                             "rand_skip: 40 }", seed=0)
    layer.forward([], tops)
    assert int(tops[1].data[0]) == firsts[0]
    layer.close()


def test_missing_source_error_names_layer_and_path(tmp_path):
    with pytest.raises(errors.DataError, match=r'layer "data".*nowhere_lmdb.*does not exist'):
        make_layer(f'data_param {{ source: "{tmp_path}/nowhere_lmdb" batch_size: 2 }}')
    with pytest.raises(errors.DataError, match=r"run tools/get_cifar10\.py"):
        make_layer(f'data_param {{ source: "{tmp_path}/cifar10_train_lmdb" batch_size: 2 }}')


def test_leveldb_default_backend(ramp_db, tmp_path, caplog):
    data_layers._warned_leveldb.discard(ramp_db)
    with caplog.at_level(logging.WARNING):
        layer, tops = make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 2 }}')
    assert "LEVELDB" in caplog.text and "reading it as LMDB" in caplog.text
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[1].data, [0, 1])
    layer.close()
    fake = tmp_path / "broken_leveldb"
    fake.mkdir()
    (fake / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(errors.DataError, match=r'layer "data".*LevelDB.*broken_leveldb.*damaged'):
        make_layer(f'data_param {{ source: "{fake}" batch_size: 2 }}')


def test_parameter_errors(ramp_db):
    src = f'data_param {{ source: "{ramp_db}" batch_size: 2 backend: LMDB }} '
    with pytest.raises(errors.NetError, match="not both"):
        make_layer(src + 'transform_param { mean_file: "m" mean_value: 1 }')
    with pytest.raises(errors.NetError, match="both force_color and force_gray"):
        make_layer(src + "transform_param { force_color: true force_gray: true }")
    with pytest.raises(errors.NetError, match="crop_size"):
        make_layer(src + "transform_param { crop_size: 4 }")
    with pytest.raises(errors.NetError, match="mean_value"):
        make_layer(src + "transform_param { mean_value: 1 mean_value: 2 }")
    with pytest.raises(errors.NetError, match="batch_size"):
        make_layer(f'data_param {{ source: "{ramp_db}" backend: LMDB }}')


def test_error_in_thread_is_reraised_with_source(tmp_path):
    db = make_db(tmp_path / "db", np.zeros((3, 1, 2, 2)))
    env = lmdb.open(db, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"00002", b"\xff\xff not a datum")
    env.close()
    layer, tops = make_layer(f'data_param {{ source: "{db}" batch_size: 2 backend: LMDB }}')
    layer.forward([], tops)  # records 0, 1 are fine
    with pytest.raises(errors.DataError, match=r'layer "data".*reading.*db'):
        layer.forward([], tops)
    layer.close()


def test_float_data_records_and_label_top_optional(tmp_path):
    env = lmdb.open(str(tmp_path / "f"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i in range(3):
            d = pio.array_to_datum(np.full((2, 1, 2), i + 0.5), label=i)
            txn.put(b"%02d" % i, d.SerializeToString())
    env.close()
    layer, tops = make_layer(f'data_param {{ source: "{tmp_path / "f"}" batch_size: 3 '
                             "backend: LMDB } transform_param { scale: 2 }", ntop=1)
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data[:, 0, 0, 0], [1.0, 3.0, 5.0])
    layer.close()


def test_deprecated_data_param_transform_fields(ramp_db):
    layer, tops = make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 1 backend: LMDB '
                             "scale: 0.5 crop_size: 2 }")
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data[0, 0], [[0.5, 1.0], [2.5, 3.0]])
    layer.close()


def test_bootstrap_sample_statistics(tmp_path):
    n = 3000
    db = make_db(tmp_path / "db", np.zeros((n, 1, 1, 1)))

    def proto(m):
        return (f'data_param {{ source: "{db}" batch_size: 500 backend: LMDB }} '
                f"bootstrap_param {{ enable: true seed: 17 member: {m} }}")

    layers = {}
    for m in (0, 1):
        layer, tops = make_layer(proto(m))
        layers[m] = layer.bootstrap_indices
        frac = len(np.unique(layer.bootstrap_indices)) / n
        assert abs(frac - (1 - np.exp(-1))) < 0.03  # ~63.2% distinct records
        # the layer serves exactly the sample, in the order drawn, then wraps round
        served = np.concatenate([lab for _, lab in batches(layer, tops, 7)])
        np.testing.assert_array_equal(served, layer.bootstrap_indices[np.arange(3500) % n])
        layer.close()
    assert not np.array_equal(layers[0], layers[1])
    again, _ = make_layer(proto(1), seed=99)  # the seed field, not the rng, decides
    np.testing.assert_array_equal(again.bootstrap_indices, layers[1])
    again.close()
    plain, _ = make_layer(f'data_param {{ source: "{db}" batch_size: 5 backend: LMDB }}')
    assert plain.bootstrap_indices is None
    plain.close()


def test_same_source_twice_in_one_process(ramp_db):
    a, ta = make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 2 backend: LMDB }}')
    b, tb = make_layer(f'data_param {{ source: "{ramp_db}" batch_size: 2 backend: LMDB }}')
    a.forward([], ta)
    b.forward([], tb)
    np.testing.assert_array_equal(ta[0].data, tb[0].data)
    a.close()
    b.forward([], tb)  # the shared environment stays open for b
    np.testing.assert_array_equal(tb[1].data, [2, 3])
    b.close()


# -- Input and DummyData ---------------------------------------------------------------------
def test_input_keeps_user_shape():
    layer, tops = make_layer("input_param { shape { dim: 2 dim: 3 } }", ntop=1, type_="Input")
    assert tops[0].shape == (2, 3)
    tops[0].reshape(5, 3)
    tops[0].data[...] = 7
    layer.reshape([], tops)
    layer.forward([], tops)
    assert tops[0].shape == (5, 3) and (tops[0].data == 7).all()
    with pytest.raises(errors.NetError, match=r"input_param\.shape"):
        make_layer("input_param { shape { dim: 1 } shape { dim: 2 } }", ntop=3, type_="Input")


def test_dummy_data_refills_only_random_tops():
    layer, tops = make_layer('dummy_data_param { shape { dim: 4 } shape { dim: 3 dim: 2 } '
                             'data_filler { type: "constant" value: 3 } '
                             'data_filler { type: "gaussian" std: 1 } }', type_="DummyData")
    np.testing.assert_array_equal(tops[0].data, [3, 3, 3, 3])
    tops[0].data[...] = -1  # a constant top is never refilled (Caffe's refill_ rule)
    layer.forward([], tops)
    first = np.array(tops[1].data, copy=True)
    layer.forward([], tops)
    assert (tops[0].data == -1).all()
    assert not np.array_equal(first, tops[1].data)
    with pytest.raises(errors.NetError, match="not both"):
        make_layer("dummy_data_param { shape { dim: 1 } num: 1 channels: 1 height: 1 width: 1 }",
                   ntop=1, type_="DummyData")
