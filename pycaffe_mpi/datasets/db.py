"""Key-value databases of Datum records: LMDB and LevelDB, read and written one way.

Caffe's ``db::DB`` in Python: ``data_param.backend`` picks LEVELDB (0, the proto default) or
LMDB (1). :func:`open_db` gives an ``lmdb.Environment`` or a :class:`LevelDBEnv`, which
offers the part of py-lmdb's read API that readers use (``begin``, ``get``, ``stat``, a
cursor with ``first``/``next``/``key``/``value``), so one reader serves both backends;
writers use :class:`DatumWriter`, which commits every 1,000 records as Caffe's tools do and
renames a finished database into place.

* LMDB through the ``lmdb`` package (:func:`pycaffe_mpi.snapshot.open_lmdb` checks a data file
  cut short before any page is read, since a missing page of a memory map is a SIGBUS).
* LevelDB through ``plyvel`` with Caffe's options (``db_leveldb.cpp``: 64 KiB blocks, 256 MiB
  write buffer, at most 100 open files). LevelDB lets one process open a database at a time;
  when another process (another MPI rank) holds it, the reader opens a private view instead:
  one consistent state of it (the manifest that CURRENT names, hard links to exactly the
  table files that manifest lists, copies of the logs it needs), removed on close.

Every failure (missing package, missing or damaged database) is a
:class:`~pycaffe_mpi.errors.DataError` naming the path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio

log = logging.getLogger(__name__)

LEVELDB, LMDB = 0, 1
BACKENDS = {"leveldb": LEVELDB, "lmdb": LMDB}
COMMIT_EVERY = 1000  # Caffe's tools commit a transaction every 1,000 records


def backend_code(backend: str | int) -> int:
    """``"lmdb"``/``"leveldb"`` (any case) or a DataParameter.DB value as LMDB or LEVELDB."""
    if isinstance(backend, int):
        if backend not in (LEVELDB, LMDB):
            raise errors.DataError(f"unknown database backend {backend}")
        return backend
    try:
        return BACKENDS[backend.lower()]
    except KeyError:
        raise errors.DataError(f"unknown database backend {backend!r}; expected lmdb or "
                               "leveldb") from None


def is_lmdb_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "data.mdb").is_file()


def is_leveldb_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "CURRENT").is_file()


def detect_backend(path: str | os.PathLike) -> int:
    """The backend of an existing database directory, by its files."""
    if is_lmdb_dir(path):
        return LMDB
    if is_leveldb_dir(path):
        return LEVELDB
    if not os.path.exists(path):
        raise errors.DataError(f"database {os.fspath(path)!r} does not exist")
    raise errors.DataError(f"{os.fspath(path)!r} is neither an LMDB (no data.mdb) nor a "
                           "LevelDB (no CURRENT)")


def _plyvel() -> Any:
    try:
        import plyvel
    except ImportError:
        raise errors.DataError("LevelDB support needs the plyvel package: "
                               "pip install plyvel") from None
    return plyvel


def _lmdb_errors() -> tuple[type[BaseException], ...]:
    import lmdb

    return (lmdb.Error,)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link file ``src`` to ``dst``, or copy it where links fail (FileNotFoundError: gone)."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dst)


class _StaleView(Exception):
    """A file that the view needs vanished while it was built: the holder moved on."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _log_records(data: bytes) -> Iterator[bytes]:
    """The records of a LevelDB log-format file: 32 KiB blocks of fragments, each with a
    7-byte header (checksum, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4).

    NOTE: a fragment cut short at the end (a holder mid-append) ends the file, as LevelDB
    reads it; LevelDB checks the checksums when the view is opened.
    """
    pos, parts = 0, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left  # zero trailer of a block
            continue
        end = pos + 7 + int.from_bytes(data[pos + 4:pos + 6], "little")
        if end > len(data):
            return
        kind, frag, pos = data[pos + 6], data[pos + 7:end], end
        if kind in (1, 2):
            parts = [frag]
        elif kind in (3, 4):
            parts.append(frag)
        if kind in (1, 4):
            yield b"".join(parts)


def _manifest_state(data: bytes) -> tuple[int, int, int, set[int]]:
    """(log number, previous log number, next file number, live table numbers) of a
    LevelDB manifest: its version edits applied in order (``version_edit.cc`` tags)."""
    numbers = {2: 0, 9: 0, 3: 0}  # log number, previous log number, next file number
    live: set[int] = set()
    for rec in _log_records(data):
        pos = 0
        while pos < len(rec):
            tag, pos = _varint(rec, pos)
            if tag in (2, 3, 4, 9):  # 4: last sequence, not needed
                numbers[tag], pos = _varint(rec, pos)
                continue
            if tag in (5, 6, 7):
                _, pos = _varint(rec, pos)  # the level
            if tag in (6, 7):
                number, pos = _varint(rec, pos)
                if tag == 6:
                    live.discard(number)
                    continue
                live.add(number)
                _, pos = _varint(rec, pos)  # the file size
            if tag not in (1, 5, 7):
                raise ValueError(f"unknown manifest tag {tag}")
            for _ in range(2 if tag == 7 else 1):  # comparator name, keys: length-prefixed
                size, pos = _varint(rec, pos)
                pos += size
    return numbers[2], numbers[9], numbers[3], live


def _build_view(src: str, dst: str) -> None:
    """Fill ``dst`` with one consistent state of LevelDB ``src``, writing nothing into ``src``.

    The state is the one that ``src``'s CURRENT names: its manifest (copied), exactly the
    table files live in that manifest (hard-linked: LevelDB never rewrites a table) and the
    write-ahead logs it still needs (copied: the view replays them in ``dst``).

    NOTE: a holder opening ``src`` meanwhile replays its log into a new table, writes a new
    manifest, switches CURRENT and then deletes the old log and manifest. Tables that the
    named manifest does not list are never linked: the view's own replay allocates file
    numbers from that manifest and would truncate such a table through the link, damaging
    ``src``. A needed file deleted before it was taken is a :class:`_StaleView` (retry).

    Raises:
        _StaleView: a needed file vanished. ValueError, IndexError: a damaged manifest.
    """
    def read(name: str) -> bytes:
        try:
            return Path(src, name).read_bytes()
        except FileNotFoundError:
            raise _StaleView(name) from None

    current = read("CURRENT")
    manifest = current.decode(errors="replace")[:-1]
    if not current.endswith(b"\n") or not manifest.startswith("MANIFEST-") or "/" in manifest:
        raise ValueError(f"CURRENT names no manifest: {current[:60]!r}")
    data = read(manifest)
    log_no, prev_log, next_file, live = _manifest_state(data)
    Path(dst, manifest).write_bytes(data)
    for number in sorted(live):
        if number >= next_file:
            raise ValueError(f"manifest {manifest} lists table {number} at or after its next "
                             f"file number {next_file}")
        for name in (f"{number:06d}.ldb", f"{number:06d}.sst"):
            with contextlib.suppress(FileNotFoundError):
                _link_or_copy(os.path.join(src, name), os.path.join(dst, name))
                break
        else:
            raise _StaleView(f"table {number:06d}.ldb")
    logs = [n for n in os.listdir(src) if n.endswith(".log") and n[:-4].isdigit()
            and (int(n[:-4]) >= log_no or int(n[:-4]) == prev_log)]
    if log_no and f"{log_no:06d}.log" not in logs:
        raise _StaleView(f"{log_no:06d}.log")
    for name in logs:
        try:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        except FileNotFoundError:
            raise _StaleView(name) from None
    Path(dst, "CURRENT").write_bytes(current)


def _message(e: BaseException) -> str:
    arg = e.args[0] if e.args else e
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


# -- reading ----------------------------------------------------------------------------------
class LevelDBEnv:
    """A LevelDB opened for reading, behind the part of py-lmdb's read API that readers use.

    ``begin()`` gives a :class:`_LevelTxn` on a snapshot (``get``, ``stat``, ``cursor``), so
    code written for an ``lmdb.Environment`` reads either backend.
    """

    def __init__(self, path: str) -> None:
        self.path, self._view_dir = path, None
        plyvel = _plyvel()
        if not os.path.isdir(path):
            raise errors.DataError(f"LevelDB {path!r} does not exist")
        try:
            self.db = plyvel.DB(path, create_if_missing=False)
        except plyvel.IOError as e:
            if "lock" not in _message(e).lower():
                raise errors.DataError(f"LevelDB {path!r} cannot be opened: "
                                       f"{_message(e)}") from None
            self.db = self._open_view(plyvel)
        except plyvel.Error as e:
            raise errors.DataError(f"LevelDB {path!r} cannot be opened: it is damaged or not "
                                   f"a LevelDB ({_message(e)}); rebuild or copy it again"
                                   ) from None
        self._entries: int | None = None

    def _open_view(self, plyvel: Any) -> Any:
        """Another process holds the database (or its directory is read-only): open a private
        view of one consistent state of it (:func:`_build_view`), in a temporary directory
        removed on close.

        NOTE: the holder may be replaying the log as the view is built; a view is built again
        only when a file it needs vanished (the holder moved to a newer state, which the next
        try takes), never to paper over an open that failed.
        """
        parent = os.path.dirname(os.path.abspath(self.path))
        tries = 8
        for attempt in range(tries):
            try:
                view = tempfile.mkdtemp(prefix=".leveldb-view-", dir=parent)
            except OSError:
                view = tempfile.mkdtemp(prefix="pycaffe-leveldb-view-")
            try:
                _build_view(self.path, view)
                db = plyvel.DB(view, create_if_missing=False)
            except _StaleView as e:
                shutil.rmtree(view, ignore_errors=True)
                if attempt == tries - 1:
                    raise errors.DataError(
                        f"LevelDB {self.path!r} is in use by another process and kept "
                        f"changing while a private view of it was built ({e} vanished)"
                        ) from None
                time.sleep(0.05 * (attempt + 1))
                continue
            except (OSError, ValueError, IndexError, plyvel.Error) as e:
                shutil.rmtree(view, ignore_errors=True)
                raise errors.DataError(
                    f"LevelDB {self.path!r} is in use by another process (or read-only) and a "
                    f"private view of it failed: it is damaged or not a LevelDB "
                    f"({type(e).__name__}: {_message(e)})") from None
            log.info("LevelDB %s is held by another process or read-only; reading a private "
                     "view of it", self.path)
            self._view_dir = view
            return db
        raise AssertionError("unreachable")

    def entries(self) -> int:
        # NOTE: LevelDB keeps no count; one pass over the keys, once.
        if self._entries is None:
            count, last = 0, None
            with self.db.iterator(include_value=False, verify_checksums=True) as it:
                for k in it:
                    count, last = count + 1, k
            self.check_end(last)
            self._entries = count
        return self._entries

    def last_key(self) -> bytes | None:
        """The largest key, read backwards from the end of the database (cached)."""
        if not hasattr(self, "_last_key"):
            with self.db.iterator(reverse=True, include_value=False,
                                  verify_checksums=True) as it:
                self._last_key = next(it, None)
        return self._last_key

    def check_end(self, key: bytes | None) -> None:
        """Raise a DataError unless a forward pass that ended after ``key`` saw every record.

        NOTE: a plyvel iterator that meets a corrupt block just stops (it does not raise), so
        a pass is complete only when it ended at the key that a backward read finds last.
        """
        last = self.last_key()
        if key is None and last is None and any(
                name.endswith((".ldb", ".sst")) and os.path.getsize(os.path.join(self.path, name))
                for name in os.listdir(self.path)):
            raise errors.DataError(f"LevelDB {self.path!r} is damaged: it has table files but "
                                   "no readable record; rebuild or copy it again")
        if key != last:
            at = f"after key {key!r}" if key is not None else "at the first record"
            raise errors.DataError(
                f"LevelDB {self.path!r} is damaged: reading stopped {at}, before the last key "
                f"{last!r} (a corrupt table block); rebuild or copy it again")

    def stat(self) -> dict[str, int]:
        return {"entries": self.entries()}

    @contextlib.contextmanager
    def begin(self, buffers: bool = False) -> Iterator[_LevelTxn]:
        snap = self.db.snapshot()
        txn = _LevelTxn(self, snap)
        try:
            yield txn
        finally:
            # NOTE: an iterator freed after its database is closed crashes plyvel: close
            # and drop every iterator of this snapshot now, while the database is open
            for cursor in txn.cursors:
                cursor.release()
            txn.cursors.clear()
            snap.close()

    def close(self) -> None:
        self.db.close()
        if self._view_dir is not None:
            shutil.rmtree(self._view_dir, ignore_errors=True)


class _LevelTxn:
    """A LevelDB snapshot with py-lmdb Transaction's read methods."""

    def __init__(self, env: LevelDBEnv, snap: Any) -> None:
        self.env, self.snap = env, snap
        self.cursors: list[_LevelCursor] = []

    def get(self, key: bytes) -> bytes | None:
        return self.snap.get(key, verify_checksums=True)

    def stat(self) -> dict[str, int]:
        return self.env.stat()

    def cursor(self) -> _LevelCursor:
        cursor = _LevelCursor(self)
        self.cursors.append(cursor)
        return cursor


class _LevelCursor:
    """py-lmdb Cursor's ``first``/``next``/``key``/``value``/``iternext`` over a snapshot."""

    def __init__(self, txn: _LevelTxn) -> None:
        self.txn = txn
        self._it: Any = None
        self._item: tuple[bytes, bytes] | None = None

    def first(self) -> bool:
        self.release()
        # NOTE: checksums on: a damaged table is a Corruption error, not garbled records
        self._it = self.txn.snap.iterator(verify_checksums=True)
        self._item = next(self._it, None)
        if self._item is None:
            self.txn.env.check_end(None)
        return self._item is not None

    def next(self) -> bool:
        if self._it is None:
            return self.first()
        key = self._item[0] if self._item else None
        self._item = next(self._it, None)
        if self._item is None:
            self.txn.env.check_end(key)
        return self._item is not None

    def release(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it, self._item = None, None

    def key(self) -> bytes:
        return self._item[0] if self._item else b""

    def value(self) -> bytes:
        return self._item[1] if self._item else b""

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        ok = self.first() if self._it is None else self._item is not None
        while ok:
            k, v = self._item  # type: ignore[misc]
            yield (k, v) if keys and values else (k if keys else v)
            ok = self.next()

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.iternext()


def backend_errors(env: Any) -> tuple[type[BaseException], ...]:
    """The exception types a read of ``env`` may raise for a damaged database."""
    if isinstance(env, LevelDBEnv):
        return (_plyvel().Error,)
    import lmdb

    return (lmdb.Error,)


def is_lmdb_env(env: Any) -> bool:
    return not isinstance(env, LevelDBEnv)


def open_db(path: str | os.PathLike, backend: str | int | None = None) -> Any:
    """Open a database for reading (``backend`` None: detected from its files).

    Returns:
        an ``lmdb.Environment`` (opened by :func:`pycaffe_mpi.snapshot.open_lmdb`, so its
        size is checked) or a :class:`LevelDBEnv` with the same read API.

    Raises:
        errors.DataError: naming ``path``: missing, damaged, or of the other backend.
    """
    path = os.fspath(path)
    code = detect_backend(path) if backend is None else backend_code(backend)
    if code == LMDB:
        if not is_lmdb_dir(path):
            hint = "; it is a LevelDB: use backend LEVELDB" if is_leveldb_dir(path) else ""
            raise errors.DataError(f"{path!r} is not an LMDB directory (no data.mdb){hint}")
        return pio.open_lmdb(path)
    return LevelDBEnv(path)


def entries(env: Any) -> int:
    """The number of records of an opened database."""
    return int(env.stat()["entries"])


class SharedDB:
    """One open database per path and process, shared by reference count.

    NOTE: LMDB and LevelDB both refuse to open one database twice in a process, yet a TRAIN
    and a TEST net, or several Data layers, may read the same source; each reader takes its
    own transaction (LMDB) or snapshot (LevelDB).
    """

    _open: ClassVar[dict[str, list[Any]]] = {}  # realpath -> [env, users]
    _lock = threading.Lock()
    # NOTE: a garbage collection inside the locked section can run a finalizer (a Data layer's
    # prefetcher being collected) that releases another database on the same thread: that
    # release is deferred to the end of the section instead of waiting for the lock it holds
    # (it deadlocked a test run once).
    _inside = threading.local()
    _deferred: ClassVar[list[Any]] = []

    @classmethod
    @contextlib.contextmanager
    def _locked(cls) -> Iterator[None]:
        with cls._lock:
            cls._inside.value = True
            try:
                yield
                while cls._deferred:
                    cls._release_one(cls._deferred.pop())
            finally:
                cls._inside.value = False

    @classmethod
    def acquire(cls, path: str, backend: str | int | None = None) -> Any:
        """The database at ``path``, opened (and checked for damage) by its first user."""
        key = os.path.realpath(path)
        with cls._locked():
            if key not in cls._open:
                cls._open[key] = [open_db(key, backend), 0]
            cls._open[key][1] += 1
            return cls._open[key][0]

    @classmethod
    def release(cls, env: Any) -> None:
        if getattr(cls._inside, "value", False):  # re-entered from a finalizer: see above
            cls._deferred.append(env)
            return
        with cls._locked():
            cls._release_one(env)

    @classmethod
    def _release_one(cls, env: Any) -> None:
        for key, entry in list(cls._open.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del cls._open[key]
                    env.close()
                return


def iter_records(path: str | os.PathLike, backend: str | int | None = None
                 ) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(key, raw value)`` of every record, in key order, once (sharing the database
    with a Data layer of this process that reads it, through :class:`SharedDB`)."""
    env = SharedDB.acquire(os.fspath(path), backend)
    try:
        with env.begin(buffers=False) as txn:
            yield from txn.cursor()
    except backend_errors(env) as e:
        raise errors.DataError(f"reading {os.fspath(path)!r} failed: the database is damaged "
                               f"({_message(e)}); rebuild or copy it again") from None
    finally:
        SharedDB.release(env)


# -- writing ----------------------------------------------------------------------------------
class DatumWriter:
    """Write (key, value) records into a new database, Caffe's ``db::Transaction`` way.

    Records are committed every :data:`COMMIT_EVERY`; the database is built under a temporary
    name beside ``path`` and renamed into place by :meth:`close`, so an interrupted run never
    leaves a half-written database. :meth:`abort` (or leaving a ``with`` block by an
    exception) removes it.

    Raises:
        errors.DataError: ``path`` exists (Caffe refuses too) and not ``overwrite``.
    """

    def __init__(self, path: str | os.PathLike, backend: str | int = "lmdb",
                 overwrite: bool = False) -> None:
        self.path, self.backend = Path(path), backend_code(backend)
        if self.path.exists():
            if not overwrite:
                raise errors.DataError(f"{self.path} already exists; delete it to rebuild it")
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(6)}.tmp"
        self.pending: list[tuple[bytes, bytes]] = []
        self.count = 0
        if self.backend == LMDB:
            import lmdb

            self.tmp.mkdir()  # NOTE: not mkdtemp, whose 0700 would outlive the rename
            self.map_size = 64 << 20
            self.db = lmdb.open(str(self.tmp), map_size=self.map_size, subdir=True,
                                meminit=False)
        else:
            plyvel = _plyvel()
            self.db = plyvel.DB(str(self.tmp), create_if_missing=True, error_if_exists=True,
                                block_size=65536, write_buffer_size=256 << 20,
                                max_open_files=100)

    def put(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))
        self.count += 1
        if len(self.pending) >= COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        if self.backend == LMDB:
            import lmdb

            while True:
                try:
                    with self.db.begin(write=True) as txn:
                        for key, value in self.pending:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:  # Caffe's newer writers double the map too
                    self.map_size *= 2
                    self.db.set_mapsize(self.map_size)
        else:
            with self.db.write_batch() as wb:
                for key, value in self.pending:
                    wb.put(key, value)
        self.pending.clear()

    def close(self) -> None:
        """Commit what is pending and move the finished database to ``path``."""
        try:
            self.commit()
            if self.backend == LMDB:
                self.db.sync(True)
            else:
                # NOTE: moves the write-ahead log into tables, so a reader's open need not
                # replay it (which would write into the database directory)
                self.db.compact_range()
        except BaseException:
            self.abort()
            raise
        self.db.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatumWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
