"""tools/convert_imageset.py: Caffe's flags, keys, BGR records, encoded records, and a net that
trains on the result through the Data layer."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pycaffe_mpi import datasets, solvers
from pycaffe_mpi.datasets import images
from pycaffe_mpi.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import convert_imageset  # noqa: E402

sys.path.pop(0)

RNG = np.random.default_rng(8)
COLOUR = RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8)    # BGR planes
SPACED = RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (1, 5, 6), dtype=np.uint8)


def save(path: Path, img: np.ndarray, fmt: str = "PNG") -> None:
    arr = img[0] if img.shape[0] == 1 else img[::-1].transpose(1, 2, 0)  # BGR -> RGB
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, fmt)


@pytest.fixture
def imageset(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    save(root / "a" / "colour.png", COLOUR)
    save(root / "b" / "with space.png", SPACED)
    save(root / "gray.png", GRAY)
    smooth = np.broadcast_to(np.linspace(30, 220, 8, dtype=np.uint8), (3, 8, 8)).copy()
    save(root / "photo.jpg", smooth, "JPEG")
    (tmp_path / "list.txt").write_text(
        "a/colour.png 3\nb/with space.png 1\nmissing.png 9\n\ngray.png 2\nphoto.jpg 0\n")
    return tmp_path


def convert(ws: Path, db: str, *flags: str) -> int:
    return convert_imageset.main([*flags, str(ws / "images") + "/", str(ws / "list.txt"),
                                  str(ws / db)])


def records(path: Path) -> dict[str, caffe_pb2.Datum]:
    return {k.decode(): d for k, d in datasets.iter_datums(path)}


def cv_gray(bgr: np.ndarray) -> np.ndarray:
    b, g, r = (bgr[c].astype(np.int64) for c in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14).astype(np.uint8)


def test_raw_records_keys_and_bgr(imageset):
    assert convert(imageset, "out_lmdb") == 0
    recs = records(imageset / "out_lmdb")
    # the missing file is skipped, its index (2) is not reused; blank lines are ignored
    assert list(recs) == ["00000000_a/colour.png", "00000001_b/with space.png",
                          "00000003_gray.png", "00000004_photo.jpg"]
    d = recs["00000000_a/colour.png"]
    assert (d.channels, d.height, d.width, d.label, d.encoded) == (3, 5, 6, 3, False)
    assert d.data == COLOUR.tobytes()
    assert recs["00000001_b/with space.png"].label == 1
    g = recs["00000003_gray.png"]  # read as colour: the gray channel three times
    assert g.data == np.repeat(GRAY, 3, axis=0).tobytes()


def test_gray_flag(imageset):
    assert convert(imageset, "g_lmdb", "--gray") == 0
    recs = records(imageset / "g_lmdb")
    d = recs["00000000_a/colour.png"]
    assert (d.channels, d.height, d.width) == (1, 5, 6)
    assert d.data == cv_gray(COLOUR).tobytes()
    assert recs["00000003_gray.png"].data == GRAY.tobytes()


def _bilinear_ref(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """OpenCV INTER_LINEAR written out pixel by pixel."""
    c, sh, sw = img.shape
    out = np.zeros((c, h, w), np.uint8)
    for y in range(h):
        fy = min(max((y + 0.5) * sh / h - 0.5, 0.0), sh - 1.0)
        y0 = int(fy)
        y1, ay = min(y0 + 1, sh - 1), fy - int(fy)
        for x in range(w):
            fx = min(max((x + 0.5) * sw / w - 0.5, 0.0), sw - 1.0)
            x0 = int(fx)
            x1, ax = min(x0 + 1, sw - 1), fx - int(fx)
            for ch in range(c):
                v = ((1 - ay) * ((1 - ax) * float(img[ch, y0, x0]) + ax * float(img[ch, y0, x1]))
                     + ay * ((1 - ax) * float(img[ch, y1, x0]) + ax * float(img[ch, y1, x1])))
                out[ch, y, x] = int(np.floor(v + 0.5))
    return out


def test_resize(imageset):
    assert convert(imageset, "r_lmdb", "--resize_height", "4", "--resize_width", "9",
                   "--check_size") == 0
    recs = records(imageset / "r_lmdb")
    assert {(d.channels, d.height, d.width) for d in recs.values()} == {(3, 4, 9)}
    got = np.frombuffer(recs["00000000_a/colour.png"].data, np.uint8).reshape(3, 4, 9)
    np.testing.assert_array_equal(got, _bilinear_ref(COLOUR, 4, 9))
    np.testing.assert_array_equal(images.resize_bilinear(COLOUR, 5, 6), COLOUR)


def test_encoded_records(imageset):
    assert convert(imageset, "e_lmdb", "--encoded") == 0
    recs = records(imageset / "e_lmdb")
    d = recs["00000000_a/colour.png"]
    assert d.encoded and (d.channels, d.height, d.width) == (0, 0, 0)  # Caffe sets none
    assert d.data == (imageset / "images/a/colour.png").read_bytes()  # the file itself
    assert recs["00000004_photo.jpg"].data == (imageset / "images/photo.jpg").read_bytes()
    np.testing.assert_array_equal(images.decode_datum(d), COLOUR)
    # another type, or a resize: the decoded image re-encoded
    assert convert(imageset, "p_lmdb", "--encode_type", "png", "--resize_height", "5",
                   "--resize_width", "6") == 0
    recs = records(imageset / "p_lmdb")
    jpg = recs["00000004_photo.jpg"]
    assert jpg.encoded and jpg.data.startswith(b"\x89PNG")
    direct = images.read_image_file(str(imageset / "images/photo.jpg"), True, 5, 6)
    np.testing.assert_array_equal(images.decode_datum(jpg), direct)
    np.testing.assert_array_equal(images.decode_datum(recs["00000000_a/colour.png"]), COLOUR)


def test_leveldb_and_reproducible_shuffle(imageset):
    assert convert(imageset, "s1_leveldb", "--backend", "leveldb", "--shuffle",
                   "--seed", "4") == 0
    assert convert(imageset, "s2_leveldb", "--backend", "leveldb", "--shuffle",
                   "--seed", "4") == 0
    a, b = records(imageset / "s1_leveldb"), records(imageset / "s2_leveldb")
    assert list(a) == list(b) and len(a) == 4
    names = [k.split("_", 1)[1] for k in a]
    assert sorted(names) == ["a/colour.png", "b/with space.png", "gray.png", "photo.jpg"]
    labels = {"a/colour.png": 3, "b/with space.png": 1, "gray.png": 2, "photo.jpg": 0}
    assert all(d.label == labels[k.split("_", 1)[1]] for k, d in a.items())


def test_user_errors(imageset, capsys):
    assert convert(imageset, "c_lmdb", "--check_size") == 1
    assert "Incorrect data field size" in capsys.readouterr().err
    assert not (imageset / "c_lmdb").exists()
    assert [p.name for p in imageset.iterdir() if p.name.startswith(".")] == []
    assert convert(imageset, "x_lmdb") == 0
    assert convert(imageset, "x_lmdb") == 1
    assert "already exists" in capsys.readouterr().err
    assert convert(imageset, "y_lmdb", "--resize_height", "4") == 1
    (imageset / "list.txt").write_text("a/colour.png three\n")
    assert convert(imageset, "z_lmdb") == 1
    assert "list.txt:1" in capsys.readouterr().err


NET = """
name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  data_param {{ source: "{db}" batch_size: 4 backend: {backend} }}
  transform_param {{ mean_value: 128 scale: 0.0078125 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""

SOLVER = """
net: "{net}"
base_lr: 0.1
lr_policy: "fixed"
max_iter: 5
display: 0
snapshot: 0
snapshot_after_train: false
random_seed: 1
solver_mode: CPU
"""


@pytest.mark.parametrize("backend,flags", [("LMDB", ["--encoded"]),
                                           ("LEVELDB", ["--backend", "leveldb", "--gray"])])
def test_trains_through_the_data_layer(imageset, backend, flags):
    db = imageset / "train_db"
    assert convert(imageset, "train_db", "--resize_height", "8", "--resize_width", "8",
                   *flags) == 0
    (imageset / "net.prototxt").write_text(NET.format(db=db, backend=backend))
    (imageset / "solver.prototxt").write_text(SOLVER.format(net=imageset / "net.prototxt"))
    solver = solvers.get_solver(str(imageset / "solver.prototxt"))
    try:
        solver.step(5)
        data = np.asarray(solver.net.blobs["data"].data)
        channels = 1 if "--gray" in flags else 3
        assert data.shape == (4, channels, 8, 8)
        want = [images.decode_datum(d) for _, d in datasets.iter_datums(db)]
        # 5 batches of 4 from 4 records: the last batch is the records in order again
        np.testing.assert_allclose(data, (np.stack(want) - 128.0) / 128.0, atol=1e-6)
        np.testing.assert_array_equal(solver.net.blobs["label"].data, [3, 1, 2, 0])
        assert np.isfinite(float(solver.net.blobs["loss"].data))
    finally:
        solver.close()


def test_read_list_file_takes_the_label_after_the_last_space(tmp_path):
    (tmp_path / "l.txt").write_text("dir/a b c.png 7\r\nx.png -1\n")
    assert images.read_list_file(str(tmp_path / "l.txt")) == [("dir/a b c.png", 7),
                                                                ("x.png", -1)]
    assert isinstance(io.BytesIO(images.encode_image(COLOUR, "jpg")).read(2), bytes)
