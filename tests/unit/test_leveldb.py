"""LevelDB sources for the Data layer, LevelDB writers, and damaged databases of either backend.

A LevelDB and an LMDB of the same records must give the same batches, the same resume and
the same bootstrap sample; a LevelDB held by another process is read through a private
view; a missing or damaged LevelDB, and a truncated LMDB read by the dataset helpers, are
DataErrors naming the path (the LMDB case runs in a subprocess: a SIGBUS would kill it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import plyvel
import pytest
from google.protobuf import text_format

from pycaffe_mpi import datasets, errors, registry
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.datasets import db as dbm
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[2]


def images(n: int = 7) -> np.ndarray:
    return (np.arange(n * 12).reshape(n, 1, 3, 4) % 251).astype(np.uint8)


@pytest.fixture
def both(tmp_path: Path) -> tuple[str, str]:
    """The same 7 records (1x3x4, labels 0..6) as a LevelDB and an LMDB."""
    imgs = images()
    datasets.write_datum_db(tmp_path / "l_leveldb", imgs, np.arange(7), backend="leveldb")
    datasets.write_datum_db(tmp_path / "m_lmdb", imgs, np.arange(7), backend="lmdb")
    return str(tmp_path / "l_leveldb"), str(tmp_path / "m_lmdb")


def make_layer(proto: str, phase: int = TEST, seed: int = 5) -> tuple:
    p = caffe_pb2.LayerParameter()
    text_format.Merge(proto, p)
    p.name, p.type = "data", "Data"
    layer = registry.layer_class("Data")(p, phase=phase, dtype=np.float64,
                                         rng=np.random.default_rng(seed))
    tops = [Blob((), np.float64) for _ in range(2)]
    layer.check_counts(0, 2)
    layer.setup([], tops)
    layer.reshape([], tops)
    return layer, tops


def batches(layer, tops, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n):
        layer.forward([], tops)
        out.append((tops[0].data.copy(), tops[1].data.copy()))
    return out


def src(path: str, extra: str = "", backend: str = "") -> str:
    b = f"backend: {backend}" if backend else ""
    return f'data_param {{ source: "{path}" batch_size: 3 {b} {extra} }}'


def test_writer_makes_a_leveldb_with_caffes_keys(both):
    leveldb, _ = both
    assert dbm.detect_backend(leveldb) == dbm.LEVELDB
    db = plyvel.DB(leveldb)
    keys = [k for k, _ in db]
    d = caffe_pb2.Datum.FromString(db.get(b"00003"))
    db.close()
    assert keys == [b"%05d" % i for i in range(7)]
    assert (d.channels, d.height, d.width, d.label) == (1, 3, 4, 3)
    assert d.data == images()[3].tobytes()


def test_leveldb_batches_equal_lmdb_batches_and_wrap(both):
    leveldb, lmdb_path = both
    a, ta = make_layer(src(leveldb))  # backend LEVELDB is the proto default
    b, tb = make_layer(src(lmdb_path, backend="LMDB"))
    got, want = batches(a, ta, 4), batches(b, tb, 4)
    a.close()
    b.close()
    for (x, y), (x2, y2) in zip(got, want):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    labels = np.concatenate([y for _, y in got])
    np.testing.assert_array_equal(labels, np.arange(12) % 7)  # wraps round after 7 records


def test_leveldb_resume_and_rand_skip_and_mirror(both):
    leveldb, _ = both
    proto = src(leveldb, "rand_skip: 5") + " transform_param { mirror: true crop_size: 2 }"
    full, tf = make_layer(proto, TRAIN)
    want = batches(full, tf, 5)
    full.close()
    first, t1 = make_layer(proto, TRAIN)
    batches(first, t1, 2)
    state = first.get_state()
    first.close()
    resumed, t2 = make_layer(proto, TRAIN, seed=99)
    resumed.set_state(state)
    got = batches(resumed, t2, 3)
    resumed.close()
    for (x, y), (x2, y2) in zip(got, want[2:]):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_leveldb_bootstrap_sample_matches_lmdb(both):
    leveldb, lmdb_path = both
    boot = " bootstrap_param { enable: true seed: 3 member: 1 }"
    a, ta = make_layer(src(leveldb) + boot, TRAIN)
    b, tb = make_layer(src(lmdb_path, backend="LMDB") + boot, TRAIN)
    np.testing.assert_array_equal(a.bootstrap_indices, b.bootstrap_indices)
    np.testing.assert_array_equal(batches(a, ta, 3)[2][1], batches(b, tb, 3)[2][1])
    a.close()
    b.close()


def test_same_leveldb_twice_in_one_process(both):
    leveldb, _ = both
    a, ta = make_layer(src(leveldb))
    b, tb = make_layer(src(leveldb))
    np.testing.assert_array_equal(batches(a, ta, 1)[0][1], batches(b, tb, 1)[0][1])
    a.close()
    np.testing.assert_array_equal(batches(b, tb, 1)[0][1], [3, 4, 5])
    b.close()


def test_leveldb_held_by_another_process_is_read_through_a_view(both):
    leveldb, _ = both
    holder = subprocess.Popen(
        [sys.executable, "-c", "import plyvel, sys; db = plyvel.DB(sys.argv[1]); "
         "print('open', flush=True); sys.stdin.read()", leveldb],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(plyvel.IOError):
            plyvel.DB(leveldb)  # LevelDB's own rule: one process at a time
        layer, tops = make_layer(src(leveldb))
        np.testing.assert_array_equal(batches(layer, tops, 3)[2][1], [6, 0, 1])
        layer.close()
    finally:
        holder.communicate("", timeout=30)
    leftovers = [n for n in os.listdir(os.path.dirname(leveldb)) if "leveldb-view" in n]
    assert not leftovers


def test_missing_and_damaged_leveldb_name_the_path(tmp_path, both):
    with pytest.raises(errors.DataError, match=r'layer "data".*nowhere_leveldb.*does not exist'):
        make_layer(src(str(tmp_path / "nowhere_leveldb")))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(errors.DataError, match=r"LevelDB.*empty_dir.*cannot be opened"):
        make_layer(src(str(empty)))
    leveldb, _ = both
    (Path(leveldb) / "CURRENT").write_text("MANIFEST-999999\n")
    with pytest.raises(errors.DataError, match=r"l_leveldb.*damaged"):
        make_layer(src(leveldb))


@pytest.mark.parametrize("part", [(0.0, 1.0), (0.4, 0.5), (0.8, 0.9)])
def test_corrupt_leveldb_table_is_a_data_error(tmp_path, part):
    # 300 records of 768 bytes: several 64 KiB blocks; damage all, one in the middle, or
    # one near the end (a plyvel iterator would just stop early there)
    db = tmp_path / "c_leveldb"
    rng = np.random.default_rng(0)
    datasets.write_datum_db(db, rng.integers(0, 256, (300, 3, 16, 16), dtype=np.uint8),
                            np.zeros(300, int), backend="leveldb")
    tables = sorted(db.glob("*.ldb")) + sorted(db.glob("*.sst"))
    assert tables, "the writer compacts records into tables"
    raw = bytearray(tables[0].read_bytes())
    lo, hi = int(len(raw) * part[0]) + 100, int(len(raw) * part[1])
    for i in range(lo, hi - 200, 97):
        raw[i] ^= 0x5A
    tables[0].write_bytes(bytes(raw))
    layer = None
    with pytest.raises(errors.DataError, match=r'layer "data".*c_leveldb.*damaged'):
        layer, tops = make_layer(f'data_param {{ source: "{db}" batch_size: 50 }}')
        for _ in range(8):
            layer.forward([], tops)
    if layer is not None:
        layer.close()
    with pytest.raises(errors.DataError, match="damaged"):
        datasets.compute_image_mean(db)


def test_lmdb_backend_on_a_leveldb_says_so(both):
    leveldb, _ = both
    with pytest.raises(errors.DataError, match=r"not an LMDB.*use backend LEVELDB"):
        make_layer(src(leveldb, backend="LMDB"))


def test_dataset_tools_write_and_read_leveldb(tmp_path, both):
    leveldb, lmdb_path = both
    np.testing.assert_array_equal(datasets.compute_image_mean(leveldb),
                                  datasets.compute_image_mean(lmdb_path))
    assert datasets.db_entries(leveldb) == 7
    keys = [k for k, _ in datasets.iter_datums(leveldb, "leveldb")]
    assert keys == [b"%05d" % i for i in range(7)]
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compute_image_mean
    finally:
        sys.path.pop(0)
    out = tmp_path / "mean.binaryproto"
    assert compute_image_mean.main(["--backend", "leveldb", leveldb, str(out)]) == 0
    assert out.is_file()
    assert compute_image_mean.main(["--backend", "lmdb", leveldb]) == 1


def test_writer_refuses_existing_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "w_leveldb"
    with dbm.DatumWriter(path, "leveldb") as w:
        w.put(b"a", b"1")
    with pytest.raises(errors.DataError, match="already exists"):
        dbm.DatumWriter(path, "leveldb")
    with pytest.raises(RuntimeError), dbm.DatumWriter(tmp_path / "x_leveldb", "leveldb") as w:
        w.put(b"a", b"1")
        raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["w_leveldb"]


def test_lmdb_writer_grows_its_map(tmp_path):
    with dbm.DatumWriter(tmp_path / "big_lmdb", "lmdb") as w:
        start = w.map_size  # 64 MiB
        for i in range(3):
            w.put(b"%d" % i, bytes(25 << 20))  # 75 MiB in one commit: the map doubles
    assert w.map_size == 2 * start
    assert datasets.db_entries(tmp_path / "big_lmdb") == 3


def test_truncated_lmdb_in_dataset_helpers_is_a_data_error(tmp_path):
    db = tmp_path / "t_lmdb"
    datasets.write_datum_lmdb(db, np.zeros((64, 3, 32, 32), np.uint8), np.zeros(64, int))
    data = db / "data.mdb"
    os.truncate(data, data.stat().st_size // 3)
    script = textwrap.dedent(f"""
        import sys
        from pycaffe_mpi import datasets, errors
        for name, call in [("entries", lambda: datasets.lmdb_entries({str(db)!r})),
                           ("iter", lambda: list(datasets.iter_datums({str(db)!r}))),
                           ("mean", lambda: datasets.compute_image_mean({str(db)!r}))]:
            try:
                call()
            except errors.DataError as e:
                assert "truncated" in str(e), e
                print(name, "DataError")
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr  # a SIGBUS would be -7
    assert out.stdout.split() == ["entries", "DataError", "iter", "DataError",
                                  "mean", "DataError"]


def _idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                    for d in arr.shape)
    path.write_bytes(head + arr.astype(np.uint8).tobytes())


def test_convert_tools_write_leveldb(tmp_path):
    imgs = np.arange(3 * 4 * 5).reshape(3, 4, 5).astype(np.uint8)
    _idx(tmp_path / "i", imgs)
    _idx(tmp_path / "l", np.array([2, 0, 1]))
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert_idx
    finally:
        sys.path.pop(0)
    out = tmp_path / "fm_leveldb"
    assert convert_idx.main([str(tmp_path / "i"), str(tmp_path / "l"), str(out),
                             "--backend", "leveldb"]) == 0
    assert dbm.detect_backend(out) == dbm.LEVELDB
    got = list(datasets.iter_datums(out))
    assert [k for k, _ in got] == [b"%08d" % i for i in range(3)]
    assert [d.label for _, d in got] == [2, 0, 1]
    assert got[1][1].data == imgs[1].tobytes()


RANK_SCRIPT = """
import sys
import numpy as np
from mpi4py import MPI
from google.protobuf import text_format
from pycaffe_mpi import registry
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TEST
from pycaffe_mpi.proto import caffe_pb2

MPI.COMM_WORLD.Barrier()  # open together: one rank replays the log while others copy
p = caffe_pb2.LayerParameter(name="data", type="Data")
text_format.Merge('data_param {{ source: "{db}" batch_size: 4 }}', p)
layer = registry.layer_class("Data")(p, phase=TEST, dtype=np.float32,
                                     rng=np.random.default_rng(0))
tops = [Blob((), np.float32), Blob((), np.float32)]
layer.setup([], tops)
labels = []
for _ in range(3):
    layer.forward([], tops)
    labels += [int(v) for v in tops[1].data]
layer.close()
# NOTE: one line from rank 0: lines printed by several ranks may interleave in mpiexec's output
every = MPI.COMM_WORLD.gather(labels, root=0)
if MPI.COMM_WORLD.Get_rank() == 0:
    print("OK", every, flush=True)
"""


def test_ranks_share_a_caffe_written_leveldb(tmp_path):
    from pycaffe_mpi.testing import mpirun

    reason = mpirun.mpi_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # as Caffe leaves it: records still in the write-ahead log (no compaction on close)
    path = tmp_path / "caffe_leveldb"
    db = plyvel.DB(str(path), create_if_missing=True)
    for i in range(10):
        d = caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(4), label=i)
        db.put(b"%08d" % i, d.SerializeToString())
    db.close()
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(db=path))
    proc = mpirun.run_python_mpi(3, script, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    want = [i % 10 for i in range(12)]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OK")]
    assert lines == [f"OK {[want] * 3}"], proc.stdout + proc.stderr
    assert [p.name for p in tmp_path.iterdir() if "view" in p.name] == []


# -- private views while a holder replays the log ----------------------------------------------
def _caffe_leveldb(path: Path, n: int = 10) -> None:
    """A LevelDB as Caffe's tools leave it: every record still in the write-ahead log."""
    db = plyvel.DB(str(path), create_if_missing=True)
    for i in range(n):
        d = caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(4), label=i)
        db.put(b"%08d" % i, d.SerializeToString())
    db.close()


def _files(path: Path) -> dict[str, bytes]:
    # NOTE: LOG (LevelDB's info log) is rotated by every open, even one refused the lock
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.name not in ("LOCK", "LOG", "LOG.old")}


def _holder_states(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """The directory as a holder's open leaves it step by step: the log replayed into table
    000005.ldb, a new manifest and log written, CURRENT switched, old log and manifest
    deleted (LevelDB's DB::Open order)."""
    _caffe_leveldb(tmp_path / "pre")
    pre = _files(tmp_path / "pre")
    plyvel.DB(str(tmp_path / "pre")).close()  # the holder's recovery, run to the end
    post = _files(tmp_path / "pre")
    assert set(pre) >= {"CURRENT", "MANIFEST-000002", "000003.log"}, sorted(pre)
    assert set(post) >= {"MANIFEST-000004", "000005.ldb", "000006.log"}, sorted(post)
    table = post["000005.ldb"]
    return {
        "writing table": {**pre, "000005.ldb": table[: len(table) // 2]},
        "table written": {**pre, "000005.ldb": table},
        "new manifest": {**pre, **{k: v for k, v in post.items() if k != "CURRENT"}},
        "current switched": {**pre, **post},
        "old files deleted": post,
    }


@pytest.mark.parametrize("state", ["writing table", "table written", "new manifest",
                                   "current switched", "old files deleted"])
def test_view_of_a_leveldb_frozen_mid_replay(tmp_path, state):
    # a holder stopped at each step of its log replay holds the lock; the reader's view must
    # see every record and leave the holder's files as they are (a view that links a table
    # its manifest does not list writes its own 000005.ldb through the link)
    files = _holder_states(tmp_path)[state]
    path = tmp_path / "held_leveldb"
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
         "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('locked', flush=True); "
         "sys.stdin.read()", str(path / "LOCK")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(plyvel.IOError, match=r"(?i)lock"):
            plyvel.DB(str(path))
        got = [d.label for _, d in datasets.iter_datums(path)]
    finally:
        holder.communicate("", timeout=30)
    assert got == list(range(10))
    assert _files(path) == files
    for name in files:  # not even rewritten with the same bytes (the holder reads them)
        assert (path / name).stat().st_mtime_ns == stamps[name], name
    assert [p.name for p in tmp_path.iterdir() if "view" in p.name] == []


def test_view_retries_only_when_a_needed_file_vanished(tmp_path, monkeypatch):
    path = tmp_path / "v_leveldb"
    _caffe_leveldb(path)
    view = tmp_path / "view"
    view.mkdir()
    (path / "000003.log").rename(tmp_path / "log")  # deleted by a holder that moved on
    with pytest.raises(dbm._StaleView, match=r"000003\.log"):
        dbm._build_view(str(path), str(view))
    (tmp_path / "log").rename(path / "000003.log")
    (path / "CURRENT").write_text("MANIFEST-000009\n")
    with pytest.raises(dbm._StaleView, match="MANIFEST-000009"):
        dbm._build_view(str(path), str(view))

    monkeypatch.setattr(dbm.time, "sleep", lambda s: None)
    env = object.__new__(dbm.LevelDBEnv)
    env.path, env._view_dir, env._entries = str(path), None, None
    with pytest.raises(errors.DataError, match=r"v_leveldb.*kept changing.*MANIFEST-000009"):
        env._open_view(plyvel)
    (path / "CURRENT").write_text("MANIFEST-000002\n")
    calls = []
    real = dbm._build_view

    def flaky(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 1:
            raise dbm._StaleView("MANIFEST-000002")
        real(src, dst)

    monkeypatch.setattr(dbm, "_build_view", flaky)
    env.db = env._open_view(plyvel)
    assert len(calls) == 2 and env.entries() == 10
    env.close()
    (path / "CURRENT").write_text("MANIFEST-000002")  # no newline: damage, not a race
    monkeypatch.setattr(dbm, "_build_view", real)
    with pytest.raises(errors.DataError, match=r"v_leveldb.*damaged"):
        env._open_view(plyvel)
    assert [p.name for p in tmp_path.iterdir() if "view" in p.name] == ["view"]


def test_manifest_state_follows_the_version_edits(tmp_path):
    path = tmp_path / "m_leveldb"
    db = plyvel.DB(str(path), create_if_missing=True, write_buffer_size=1 << 16)
    for i in range(4000):
        db.put(b"%08d" % i, bytes(range(256)) * 2)
    db.compact_range()
    db.close()
    manifest = (path / "CURRENT").read_text().strip()
    log_no, prev_log, next_file, live = dbm._manifest_state((path / manifest).read_bytes())
    tables = {int(p.stem) for p in path.iterdir() if p.suffix in (".ldb", ".sst")}
    assert live == tables and max(live) < next_file  # compaction deleted the older tables
    assert (path / f"{log_no:06d}.log").is_file() and prev_log == 0
