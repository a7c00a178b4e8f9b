"""Damaged data and hostile parameters end in the project's own errors, never a crash.

Damaged LMDBs (truncated data file, garbage meta pages, corrupt or short records), blob
counts over INT_MAX and failed allocations, filler parameters out of range, and Accuracy on
non-finite scores. LMDB damage is read in a subprocess, so a SIGBUS fails the test instead of
killing pytest. (Disk-full and stale temporary files: test_reliability_snapshot.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import datasets, errors, fillers, registry
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.blob import INT_MAX, Blob, BlobAllocationError, _checked_count, name_layer
from pycaffe_mpi.layer import TEST
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RNG = np.random.default_rng(1701)


# == damaged LMDBs =============================================================================
# Reads the database named by argv[1] with a Data layer; exit 0 = read fine, 3 = our
# DataError (message on stdout). Anything else (a traceback, a signal) fails the test.
READER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from google.protobuf import text_format
    from pycaffe_mpi import errors, registry
    from pycaffe_mpi.blob import Blob
    from pycaffe_mpi.proto import caffe_pb2

    src, mode = sys.argv[1], sys.argv[2]
    p = text_format.Parse('name: "cifar_data" type: "Data" data_param { source: "%s" '
                          'batch_size: 4 backend: LMDB prefetch: 1 }' % src,
                          caffe_pb2.LayerParameter())
    try:
        layer = registry.layer_class("Data")(p, phase=1)
        tops = [Blob(()), Blob(())]
        layer.setup([], tops)
        if mode == "shrink":  # the file is cut short while the reader is running
            deadline = time.time() + 20
            while not layer._prefetcher.queue.full() and time.time() < deadline:
                time.sleep(0.01)
            with open(src + "/data.mdb", "r+b") as f:
                f.truncate(8192)
        for _ in range(12):
            layer.forward([], tops)
        layer.close()
    except errors.DataError as e:
        print(e)
        sys.exit(3)
    print("read", tops[1].data.tolist())
""")


def run_reader(src, mode="read"):
    proc = subprocess.run([sys.executable, "-c", READER, str(src), mode], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode < 0:
        pytest.fail(f"the reader died of signal {signal.Signals(-proc.returncode).name}:\n"
                    f"{proc.stderr}")
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def good_db(tmp_path_factory):
    """24 records of 3x32x32 (one overflow page each: a file of ~30 pages)."""
    path = tmp_path_factory.mktemp("lmdb") / "cifar_lmdb"
    imgs = np.random.default_rng(0).integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    datasets.write_datum_lmdb(path, imgs, np.arange(24) % 10)
    return path


def damaged_copy(good_db, tmp_path, damage):
    path = tmp_path / "cifar_lmdb"
    shutil.copytree(good_db, path)
    data = path / "data.mdb"
    damage(data)
    return path


def truncate_to(fraction):
    def damage(data):
        with open(data, "r+b") as f:
            f.truncate(int(os.path.getsize(data) * fraction) // 4096 * 4096)
    return damage


def overwrite(offset, size):
    def damage(data):
        with open(data, "r+b") as f:
            f.seek(offset)
            f.write(np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8).tobytes())
    return damage


def test_intact_database_reads(good_db):
    rc, out = run_reader(good_db)
    assert rc == 0 and out.startswith("read"), out


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_database_is_a_data_error_at_open(good_db, tmp_path, fraction):
    src = damaged_copy(good_db, tmp_path, truncate_to(fraction))
    rc, out = run_reader(src)
    assert rc == 3, out
    assert "truncated" in out and str(src) in out
    assert 'layer "cifar_data" (type Data)' in out and "data_param.source" in out


def test_database_cut_short_while_reading_is_a_data_error(good_db, tmp_path):
    src = damaged_copy(good_db, tmp_path, lambda data: None)
    rc, out = run_reader(src, "shrink")
    assert rc == 3, out
    assert "truncated" in out and str(src) in out and 'layer "cifar_data"' in out


def zero_meta_pages(data):
    with open(data, "r+b") as f:
        f.write(bytes(8192))


@pytest.mark.parametrize("damage", [overwrite(0, 8192), overwrite(0, 4096), overwrite(4096, 4096),
                                    zero_meta_pages, truncate_to(0.0)],
                         ids=["both_meta_pages", "first_meta_page", "second_meta_page",
                              "zeroed_meta_pages", "empty_file"])
def test_damaged_meta_pages_are_a_data_error(good_db, tmp_path, damage):
    src = damaged_copy(good_db, tmp_path, damage)
    rc, out = run_reader(src)
    assert rc == 3, out
    assert "cannot be opened" in out and str(src) in out and 'layer "cifar_data"' in out


def test_corrupt_pages_after_the_meta_pages_are_a_data_error(good_db, tmp_path):
    src = damaged_copy(good_db, tmp_path, overwrite(8192, 3 * 4096))
    rc, out = run_reader(src)
    assert rc == 3, out
    assert str(src) in out and 'layer "cifar_data"' in out and "damaged" in out


def test_garbled_record_names_its_key(good_db, tmp_path):
    src = damaged_copy(good_db, tmp_path, lambda data: None)
    import lmdb

    env = lmdb.open(str(src), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"00002", b"\xff\xff\xff garbage")
    env.close()
    rc, out = run_reader(src)
    assert rc == 3, out
    assert "00002" in out and "not a valid Datum" in out and str(src) in out


def test_short_record_is_a_data_error(good_db, tmp_path):
    src = damaged_copy(good_db, tmp_path, lambda data: None)
    import lmdb

    short = caffe_pb2.Datum(channels=3, height=32, width=32, data=b"\x01" * 1000, label=1)
    env = lmdb.open(str(src), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"00005", short.SerializeToString())
    env.close()
    rc, out = run_reader(src)
    assert rc == 3, out
    assert "00005" in out and "short" in out and "1000 data bytes" in out


def test_open_lmdb_checks_size_directly(good_db, tmp_path):
    env = pio.open_lmdb(good_db)
    try:
        needed = pio.lmdb_bytes_needed(env)
        assert needed == os.path.getsize(good_db / "data.mdb")
        pio.check_lmdb(env, good_db)
        with pytest.raises(errors.DataError, match="truncated"):
            pio.check_lmdb(env, good_db, needed + 4096)
    finally:
        env.close()
    with pytest.raises(errors.DataError, match="cannot be opened"):
        pio.open_lmdb(damaged_copy(good_db, tmp_path, overwrite(0, 8192)))


# == huge shapes =================================================================================
def test_count_limit_is_int_max_as_in_caffe():
    assert _checked_count((INT_MAX,)) == INT_MAX
    assert _checked_count((0, 2**40)) == 0  # Caffe stops checking at a zero count
    with pytest.raises(errors.ShapeError, match="exceeds INT_MAX"):
        _checked_count((INT_MAX + 1,))
    with pytest.raises(errors.ShapeError, match=r'blob "fc6" of shape \(65536, 65536\)'):
        Blob((2**16, 2**16), name="fc6")


def test_huge_shape_in_a_net_is_our_error():
    p = text_format.Parse('layer { name: "huge" type: "DummyData" top: "x" '
                          "dummy_data_param { shape { dim: 100000 dim: 100000 dim: 3 } } }",
                          caffe_pb2.NetParameter())
    with pytest.raises(errors.PycaffeError, match=r"exceeds INT_MAX.*\(100000, 100000, 3\)"):
        Net(p, TEST)


def test_huge_shape_in_a_net_names_the_layer():
    p = text_format.Parse('layer { name: "huge" type: "DummyData" top: "x" '
                          "dummy_data_param { shape { dim: 100000 dim: 100000 dim: 3 } } }",
                          caffe_pb2.NetParameter())
    with pytest.raises(errors.PycaffeError, match='layer "huge"'):
        Net(p, TEST)


class _NoMemory:
    """A backend whose allocations fail as NumPy's and CuPy's do."""

    kind = "cpu"

    def __init__(self, fail_above):
        def zeros(n, dtype):
            if n > fail_above:
                raise MemoryError(f"Unable to allocate array with {n} elements")
            return np.zeros(n, dtype)
        self.xp = types.SimpleNamespace(zeros=zeros)


def test_failed_allocation_names_shape_and_bytes_and_keeps_the_blob():
    blob = Blob((2, 3), np.float64, backend=_NoMemory(100), name="conv1")
    blob.data[...] = 7
    with pytest.raises(BlobAllocationError) as info:
        blob.reshape(10, 20, 30)
    msg = str(info.value)
    assert 'blob "conv1" of shape (10, 20, 30) (float64)' in msg and "2 x 48000 bytes" in msg
    assert isinstance(info.value, MemoryError) and isinstance(info.value, errors.PycaffeError)
    assert blob.shape == (2, 3) and (blob.data == 7).all()


def test_real_allocation_failure_is_our_error():
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from pycaffe_mpi.blob import Blob, BlobAllocationError
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        try:
            Blob((2**15, 2**15 - 1), np.float64)  # 2 x 8 GiB
        except BlobAllocationError as e:
            print(e)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "shape (32768, 32767)" in proc.stdout and "8589672448 bytes" in proc.stdout


# == fillers ====================================================================================
def layer_param(text):
    return text_format.Parse('name: "conv1" type: "Convolution" ' + text,
                             caffe_pb2.LayerParameter())


@pytest.mark.parametrize("filler, field, message", [
    ('type: "gaussian" std: -0.5', "std", "must be >= 0"),
    ('type: "gaussian" std: nan', "std", "finite"),
    ('type: "gaussian" mean: inf', "mean", "finite"),
    ('type: "uniform" min: 2 max: 1', "min", "min <= max"),
    ('type: "uniform" max: nan', "max", "finite"),
    ('type: "constant" value: nan', "value", "finite"),
    ('type: "gausian"', "type", 'did you mean "gaussian"'),
    ('type: "xavier" sparse: 3', "sparse", "gaussian filler only"),
])
def test_filler_out_of_range_names_layer_and_field(filler, field, message):
    lp = layer_param(f"convolution_param {{ num_output: 2 weight_filler {{ {filler} }} }}")
    with pytest.raises(errors.NetError) as info:
        fillers.check_layer_fillers(lp, "net.prototxt:12")
    msg = str(info.value)
    assert msg.startswith('net.prototxt:12: layer "conv1" (type Convolution), field '
                          f"convolution_param.weight_filler.{field}:"), msg
    assert message in msg
    with pytest.raises(errors.NetError, match=message):  # fill() checks as well
        fillers.fill(lp.convolution_param.weight_filler, (2, 3), RNG, layer=lp,
                     field="convolution_param.weight_filler")


def test_valid_fillers_pass_and_std_zero_is_the_mean():
    lp = layer_param('convolution_param { weight_filler { type: "gaussian" std: 0 mean: 2 } '
                     'bias_filler { type: "uniform" min: 1 max: 1 } }')
    fillers.check_layer_fillers(lp)
    out = fillers.fill(lp.convolution_param.weight_filler, (2, 3), RNG)
    assert (out == 2).all()


@pytest.mark.parametrize("kind", ["xavier", "msra"])
@pytest.mark.parametrize("shape", [(), (0, 4)])
def test_fan_fillers_need_a_fan(kind, shape):
    lp = layer_param(f'convolution_param {{ weight_filler {{ type: "{kind}" }} }}')
    with pytest.raises(errors.NetError, match=r'layer "conv1".*weight_filler.type.*fan'):
        fillers.fill(lp.convolution_param.weight_filler, shape, RNG, layer=lp,
                     field="convolution_param.weight_filler")


def test_sparse_keep_probability_must_be_in_0_1():
    f = text_format.Parse('type: "gaussian" sparse: 5', caffe_pb2.FillerParameter())
    with pytest.raises(errors.NetError, match=r"5 / 3 is outside \[0, 1\]"):
        fillers.fill(f, (3, 4), RNG)
    assert (fillers.fill(f, (5, 4), RNG) != 0).all()  # probability 1 keeps everything


def test_dummy_data_filler_error_names_layer_and_repeated_field():
    p = text_format.Parse(
        'layer { name: "noise" type: "DummyData" top: "a" top: "b" dummy_data_param { '
        'shape { dim: 2 } data_filler { type: "constant" } '
        'data_filler { type: "gaussian" std: -1 } } }', caffe_pb2.NetParameter())
    with pytest.raises(errors.NetError,
                       match=r'layer "noise".*dummy_data_param.data_filler\[1\].std'):
        Net(p, TEST)


def test_net_names_the_layer_of_a_bad_weight_filler():
    p = text_format.Parse(
        'layer { name: "d" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 '
        'dim: 3 } } } layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
        'inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: -1 } } }',
        caffe_pb2.NetParameter())
    with pytest.raises(errors.NetError, match=r'layer "ip".*weight_filler.std'):
        Net(p, TEST)


# == Accuracy on non-finite scores ===============================================================
def accuracy(scores, labels, top_k=1, dtype=np.float64):
    p = text_format.Parse(f'name: "acc" type: "Accuracy" accuracy_param {{ top_k: {top_k} }}',
                          caffe_pb2.LayerParameter())
    layer = registry.layer_class("Accuracy")(p, phase=TEST, dtype=dtype)
    bottom = [Blob(np.shape(scores), dtype), Blob(np.shape(labels), dtype)]
    bottom[0].data[...] = scores
    bottom[1].data[...] = labels
    top = [Blob((), dtype), Blob((), dtype)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return float(top[0].data), np.array(top[1].data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diverged_scores_are_not_correct(dtype):
    nan = np.full((4, 3), np.nan)
    acc, per_class = accuracy(nan, [0, 1, 2, 0], dtype=dtype)
    assert acc == 0.0 and (per_class == 0).all()  # Caffe's rule reports 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_score_makes_its_row_wrong(bad):
    scores = np.array([[3.0, 1.0, 0.0],   # correct
                       [3.0, 1.0, 0.0],   # correct unless poisoned
                       [0.0, 5.0, 1.0],   # wrong (label 0)
                       [0.0, 1.0, 2.0]])  # correct
    labels = [0, 0, 0, 2]
    assert accuracy(scores, labels)[0] == 0.75
    scores[1, 2] = bad  # a non-finite score in another class of a correct row
    acc, per_class = accuracy(scores, labels)
    assert acc == 0.5
    np.testing.assert_allclose(per_class, [1 / 3, 0, 1])


def test_inf_ties_are_not_correct_even_within_top_k():
    scores = np.array([[np.inf, np.inf, 0.0], [4.0, 2.0, 1.0]])
    # Caffe: one other class >= the true one, so top-2 calls row 0 correct
    assert accuracy(scores, [0, 0], top_k=2)[0] == 0.5


def test_finite_scores_keep_caffes_rule():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, (40, 5)).astype(float)  # many ties
    labels = rng.integers(0, 5, 40)
    for k in (1, 2, 3):
        expect = np.mean([(scores[i] >= scores[i, y]).sum() - 1 < k
                          for i, y in enumerate(labels)])
        assert accuracy(scores, labels, top_k=k)[0] == pytest.approx(expect)


def test_name_layer_prefixes_blob_errors_once():
    lp = text_format.Parse('name: "fc6" type: "InnerProduct"', caffe_pb2.LayerParameter())
    try:
        Blob((2**16, 2**16))
    except errors.ShapeError as e:
        named = name_layer(e, lp)
    assert type(named) is errors.ShapeError
    assert str(named).startswith('layer "fc6" (type InnerProduct): blob size exceeds INT_MAX')
    assert name_layer(named, lp) is named  # already named: unchanged
    oom = name_layer(MemoryError(), lp)
    assert isinstance(oom, BlobAllocationError) and str(oom) == (
        'layer "fc6" (type InnerProduct): out of memory')
    other = ValueError("x")
    assert name_layer(other, lp) is other
