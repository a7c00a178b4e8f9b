"""Data layers: Input, DummyData, and Data (LMDB or LevelDB of Datum records + transform_param).

Data layers have no bottoms and no gradient (``backward`` does nothing). ``Data`` reads and
preprocesses whole batches in a background thread (Caffe's ``BasePrefetchingDataLayer``) so the
training loop only copies a ready batch into its tops.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors, fillers
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.datasets import db as dbm
from pycaffe_mpi.datasets import images as imgs
from pycaffe_mpi.layer import TRAIN, Layer
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

log = logging.getLogger(__name__)

LEVELDB, LMDB = 0, 1
_warned_leveldb: set[str] = set()


# == Input =====================================================================================
@register_layer("Input")
class Input(Layer):
    """Tops that the user fills (``net.blobs["data"].data[...] = x``); forward does nothing.

    Params (``input_param``): shape, given once for all tops, once per top, or not at all
    (then the tops are shaped by the user, e.g. when restoring a net).

    Shapes:
        top[i]: ``input_param.shape[i]`` (or ``shape[0]``). Reshaping a top by hand sticks:
            ``reshape`` leaves the tops alone.

    Backward: none (a data layer: as in Caffe, nothing is passed down).
    """

    is_data = True
    exact_num_bottom = 0
    min_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shapes = [tuple(int(d) for d in s.dim) for s in self.layer_param.input_param.shape]
        self.require(len(shapes) in (0, 1, len(top)), "input_param.shape",
                     f"give shape once, once per top ({len(top)}) or not at all; "
                     f"got {len(shapes)}")
        for i, t in enumerate(top):
            if shapes:
                t.reshape(shapes[0] if len(shapes) == 1 else shapes[i])

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Nothing: the tops keep the shape given in setup or later by the user."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Nothing: the user writes the tops."""


# == DummyData =================================================================================
@register_layer("DummyData")
class DummyData(Layer):
    """Tops of fixed shapes filled by fillers (benchmarks, tests, placeholder inputs).

    Params (``dummy_data_param``): shape (repeated BlobShape: once for all tops or once per
    top) or the legacy num/channels/height/width (each once or once per top); data_filler
    (once for all tops or once per top; default constant 0).

    Shapes:
        top[i]: ``shape[i]`` (or ``shape[0]``), or (num, channels, height, width).

    Forward: tops whose filler is ``constant`` are filled once, in setup; the others are
    refilled from ``self.rng`` on every forward (Caffe's ``refill_`` rule).
    Backward: none (a data layer: as in Caffe, nothing is passed down).
    """

    is_data = True
    exact_num_bottom = 0
    min_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.dummy_data_param
        n = len(top)
        self.require(len(p.data_filler) in (0, 1, n), "dummy_data_param.data_filler",
                     f"give data_filler 0, 1 or {n} (one per top) times; got {len(p.data_filler)}")
        self.fillers: list[Any] = list(p.data_filler) or [None]  # None = constant 0
        self.shapes = self._shapes(p, n)
        # a filler per top (a single one serves all)
        self.top_fillers = [self.fillers[i if len(self.fillers) > 1 else 0] for i in range(n)]
        self.filler_fields = [f"dummy_data_param.data_filler[{i if len(self.fillers) > 1 else 0}]"
                              for i in range(n)]
        self.refill = [f is not None and f.type != "constant" for f in self.top_fillers]
        for i, t in enumerate(top):
            fillers.check_filler(self.top_fillers[i], self, self.filler_fields[i])
            t.reshape(self.shapes[i])
            if not self.refill[i]:
                self._fill(t, i)

    def _shapes(self, p: Any, n: int) -> list[tuple[int, ...]]:
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if any(legacy):
            self.require(not len(p.shape), "dummy_data_param.shape",
                         "give shape or the legacy num/channels/height/width, not both")
            for name, vals in zip(("num", "channels", "height", "width"), legacy):
                self.require(len(vals) in (1, n), f"dummy_data_param.{name}",
                             f"give it once or once per top ({n}); got {len(vals)} values")
            return [tuple(int(v[0] if len(v) == 1 else v[i]) for v in legacy) for i in range(n)]
        self.require(len(p.shape) in (1, n), "dummy_data_param.shape",
                     f"give shape once or once per top ({n}); got {len(p.shape)}")
        return [tuple(int(d) for d in p.shape[0 if len(p.shape) == 1 else i].dim)
                for i in range(n)]

    def _fill(self, t: Blob, i: int) -> None:
        backend_mod.upload(self.xp, fillers.fill(self.top_fillers[i], t.shape, self.rng,
                                                 self.dtype, self, self.filler_fields[i]), t.data)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Nothing: the shapes are fixed in setup."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for i, t in enumerate(top):
            if self.refill[i]:
                self._fill(t, i)


# == the data transformer ======================================================================
class DataTransformer:
    """Caffe's ``DataTransformer`` for whole batches (``transform_param``), on the host.

    Params: scale (1), mirror (false), crop_size (0), mean_file or mean_value (one value for
    every channel or one per channel; not both), force_color / force_gray (false; not both):
    decode encoded Datums as 3-channel BGR / 1-channel gray instead of as stored
    (``decode_color``: True, False or None); like Caffe, they do nothing to raw Datums.

    Per element, in Caffe's order: crop (a random offset per example in TRAIN, centred in
    TEST) → mirror (left-right, with probability 1/2 per example, in any phase, when mirror is
    on) → y = (x − mean) · scale, where a mean_file mean is the full C×H×W image indexed at
    the source pixel's uncropped, unmirrored position.
    """

    def __init__(self, layer_param: Any, tp: Any, phase: int) -> None:
        # NOTE: keeps the LayerParameter (for error messages), never the layer: the prefetch
        # thread holds this object, and a reference to the layer would keep it alive forever.
        self.layer_param = layer_param
        self._require(not (tp.force_color and tp.force_gray), "transform_param.force_gray",
                      "cannot set both force_color and force_gray")
        # how encoded Datums are decoded: 3 channels, 1 channel, or as stored
        self.decode_color: bool | None = (True if tp.force_color else
                                          False if tp.force_gray else None)
        self._require(not (tp.mean_file and len(tp.mean_value)), "transform_param.mean_value",
                      "give mean_file or mean_value, not both (Caffe refuses it too)")
        self.scale = float(tp.scale)
        self.mirror = bool(tp.mirror)
        self.crop_size = int(tp.crop_size)
        self.phase = phase
        self.mean_file = tp.mean_file
        self.mean_value = [float(v) for v in tp.mean_value]
        self.mean: np.ndarray | None = None  # (C, H, W) or (C, 1, 1), in dtype

    def _require(self, cond: Any, field: str, msg: str) -> None:
        errors.require(cond, self.layer_param, field, msg)

    def setup(self, shape: tuple[int, int, int], dtype: Any) -> tuple[int, int, int]:
        """Check the transform against a C×H×W datum; return the output C×H'×W'."""
        c, h, w = shape
        crop = self.crop_size
        self._require(crop <= min(h, w), "transform_param.crop_size",
                      f"crop_size {crop} is larger than the {h}x{w} images")
        if self.mean_file:
            mean = _read_mean(self.layer_param, self.mean_file)
            self._require(mean.size == c * h * w and mean.shape[-3:] == shape,
                          "transform_param.mean_file",
                          f"mean {self.mean_file!r} has shape {mean.shape}; the data is "
                          f"{c}x{h}x{w}")
            self.mean = mean.reshape(shape).astype(dtype)
        elif self.mean_value:
            vals = self.mean_value
            self._require(len(vals) in (1, c), "transform_param.mean_value",
                          f"give 1 mean_value or one per channel ({c}); got {len(vals)}")
            self.mean = np.asarray(vals * (c if len(vals) == 1 else 1),
                                   dtype=dtype).reshape(c, 1, 1)
        return (c, crop, crop) if crop else shape

    def __call__(self, x: np.ndarray, gen: np.random.Generator, dtype: Any) -> np.ndarray:
        """Transform a batch ``x`` (N, C, H, W) (uint8 or float) into (N, C, H', W') ``dtype``."""
        n, c, h, w = x.shape
        crop = self.crop_size
        oh, ow = (crop, crop) if crop else (h, w)
        flip = gen.integers(0, 2, n).astype(bool) if self.mirror else np.zeros(n, bool)
        if crop and self.phase == TRAIN:
            h_off, w_off = gen.integers(0, h - crop + 1, n), gen.integers(0, w - crop + 1, n)
        else:
            h_off, w_off = np.full(n, (h - oh) // 2), np.full(n, (w - ow) // 2)
        if crop or flip.any():
            rows = h_off[:, None] + np.arange(oh)                    # (N, H')
            cols = w_off[:, None] + np.arange(ow)                    # (N, W')
            cols = np.where(flip[:, None], cols[:, ::-1], cols)      # mirror: read right to left
            ci = np.arange(c)[None, :, None, None]
            ri, wi = rows[:, None, :, None], cols[:, None, None, :]
            out = x[np.arange(n)[:, None, None, None], ci, ri, wi].astype(dtype)  # (N, C, H', W')
            mean = self.mean[ci[0], ri, wi] if self.mean_file else self.mean
        else:
            out = x.astype(dtype)
            mean = self.mean
        if mean is not None:
            out -= mean
        if self.scale != 1:
            out *= out.dtype.type(self.scale)
        return out


def _read_mean(layer_param: Any, path: str) -> np.ndarray:
    try:
        return pio.read_binaryproto(path)
    except errors.DataError as e:
        raise errors.DataError(f"{errors.layer_where(layer_param)}, field "
                               f"transform_param.mean_file: {e}") from None


# == Data ======================================================================================
class _Failure:
    """An exception raised in the prefetch thread, carried to ``forward``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Prefetcher:
    """Reads, decodes and transforms batches in a daemon thread into a bounded queue.

    Holds no reference to the layer, so a dropped layer is collected and (through a weakref
    finalizer) stops its thread.
    """

    def __init__(self, env: Any, batch_size: int, transform: DataTransformer, dtype: Any,
                 gen: np.random.Generator, pos: int, entries: int, order: np.ndarray | None,
                 keys: list[bytes] | None, depth: int, source: str = "",
                 replica: tuple[int, int] = (0, 1)) -> None:
        self.env, self.batch_size, self.transform = env, batch_size, transform
        self.replica = replica  # (k, n): read record i only when i mod n == k
        # NOTE: LevelDB reads files, not a memory map: no size to check
        self.source = source
        self.needed = pio.lmdb_bytes_needed(env) if dbm.is_lmdb_env(env) else 0
        self.dtype, self.gen, self.order, self.keys = dtype, gen, order, keys
        # records read so far (counting rand_skip); with the generator's state after each
        # batch it is the layer's resumable position
        self.pos, self.entries = pos, entries
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pycaffe-data-prefetch",
                                       daemon=True)
        self.thread.start()

    # -- producer side ------------------------------------------------------------------------
    def _records(self, txn: Any) -> Iterator[tuple[bytes, bytes | None]]:
        """(key, raw record) forever, wrapping round at the end (Caffe restarts its cursor)."""
        k, n = self.replica
        if self.order is not None and self.keys is not None:
            while True:
                i = self.pos
                self.pos += 1
                if i % n == k:
                    key = self.keys[self.order[i % len(self.order)]]
                    yield key, txn.get(key)
        cur = txn.cursor()
        cur.first()
        for _ in range(self.pos % max(self.entries, 1)):
            cur.next()
        while True:
            keep = self.pos % n == k  # Caffe's DataLayer::Skip over the global position
            self.pos += 1
            if keep:
                yield cur.key(), cur.value()
            if not cur.next():
                cur.first()

    def _batch(self, records: Iterator[tuple[bytes, bytes | None]]
               ) -> tuple[np.ndarray, np.ndarray]:
        # NOTE: a file cut short after open would be a SIGBUS on the next page read.
        if self.needed:
            pio.check_lmdb(self.env, self.source, self.needed)
        datums = [_parse_datum(*next(records)) for _ in range(self.batch_size)]
        first = datums[0]
        shape = (first.channels, first.height, first.width)
        for i, d in enumerate(datums):
            if (d.channels, d.height, d.width) != shape:
                raise errors.DataError(f"record {i} of a batch has shape "
                                       f"{(d.channels, d.height, d.width)}, the first {shape}")
        if not first.encoded and all(len(d.data) == first.channels * first.height * first.width
                                     for d in datums):
            raw = np.frombuffer(b"".join(d.data for d in datums), dtype=np.uint8)
            x = raw.reshape(len(datums), *shape)
        else:  # float_data or encoded images: one record at a time
            x = _decode_batch(datums, self.transform.decode_color)
        labels = np.fromiter((d.label for d in datums), dtype=self.dtype, count=len(datums))
        return self.transform(x, self.gen, self.dtype), labels

    def _put(self, item: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with self.env.begin(buffers=False) as txn:
                records = self._records(txn)
                while not self.stop_event.is_set():
                    batch = self._batch(records)
                    # NOTE: the records up to the next multiple of n belong to other replicas,
                    # so every replica saves the same position (a resume may change n)
                    n = self.replica[1]
                    state = {"pos": -(-self.pos // n) * n, "gen": self.gen.bit_generator.state}
                    if not self._put((batch, state)):
                        return
        except dbm.backend_errors(self.env) as e:  # e.g. MDB_CORRUPTED, LevelDB Corruption
            self._put(_Failure(errors.DataError(f"the database is damaged ({e}); rebuild or "
                                                "copy it again")))
        except SystemExit as e:  # the thread must not end mute: forward would wait on it
            self._put(_Failure(errors.DataError(f"sys.exit({e.code!r}) in the prefetch thread")))
        except Exception as e:  # handed to forward, which re-raises it with the source path
            self._put(_Failure(e))
        finally:
            if getattr(self, "release_on_exit", False):
                dbm.SharedDB.release(self.env)

    # -- consumer side ------------------------------------------------------------------------
    def next_batch(self) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
        """The next (data, labels) and the reader state just after it."""
        while True:
            try:
                item = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise errors.DataError("the prefetch thread has stopped") from None
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def stop(self) -> None:
        self.stop_event.set()
        if threading.current_thread() is self.thread:
            # NOTE: the layer was collected by a GC pass on this very thread; it cannot join
            # itself ("cannot join current thread"): it ends at its next stop check and
            # releases the database then
            self.release_on_exit = True
            return
        while self.thread.is_alive():
            try:  # drain so a producer blocked on a full queue sees the stop flag
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)
        dbm.SharedDB.release(self.env)


@register_layer("Data")
class Data(Layer):
    """Batches of Datum records from an LMDB or LevelDB, preprocessed by ``transform_param``.

    Params (``data_param``): source (database directory), batch_size, rand_skip (0: skip a
    random number < rand_skip of records at the start), backend (LEVELDB, the proto default,
    or LMDB; a LEVELDB source that is an LMDB directory is read as LMDB with a warning, an
    LMDB source that is a LevelDB is an error), prefetch (4 batches), force_encoded_color
    (false: decode encoded Datums as 3-channel BGR unless transform_param forces gray).
    Encoded Datums (JPEG/PNG bytes, ``convert_imageset --encoded``) are decoded with Pillow
    into Caffe's (OpenCV's) BGR order, as stored (gray files 1 channel) unless
    transform_param's force_color / force_gray or force_encoded_color say otherwise; the
    records of one batch must decode to one shape. ``transform_param``: see
    :class:`DataTransformer` (the
    deprecated data_param scale/mean_file/crop_size/mirror are honoured when transform_param
    does not set them). ``bootstrap_param`` (our extension, for bagging ensembles): with
    enable: true, the layer reads a bootstrap sample of the records instead of the records
    in key order: DB-size indices drawn with replacement by a Generator seeded with
    seed + member (seed −1: drawn from the layer's rng), read in the order drawn; the same
    sample every epoch. About 63.2% of the records appear in a sample.

    Shapes:
        top[0]: (batch_size, C, H', W') with H' = W' = crop_size when cropping.
        top[1] (optional): labels, (batch_size,).

    Forward: the next batch_size records, transformed; top[1] = their labels.
    Backward: none (a data layer: as in Caffe, nothing is passed down).

    Records are read in key order and wrap round at the end of the database. A daemon thread
    reads, decodes and transforms whole batches into a queue of ``prefetch`` batches; its
    random crops and mirrors come from a Generator seeded from ``self.rng`` at setup, so runs
    are reproducible. Call :meth:`close` to stop the thread early (it also stops when the
    layer is garbage-collected or the process exits).

    A damaged database is a DataError naming the layer and the source, never a crash: a data
    file shorter than its last used page (checked at open and again before every batch, since
    LMDB reads through a memory map and a missing page would be a SIGBUS), damaged meta pages,
    corrupt pages, a LevelDB that cannot be opened or whose tables are corrupt, garbled or
    short records (named by key), and encoded images that do not decode. A LevelDB that
    another process (another MPI rank) holds open is read through a private view of its
    files (LevelDB allows one process per database).
    """

    is_data = True
    exact_num_bottom = 0
    min_top = 1
    max_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.data_param
        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.require(self.batch_size > 0, "data_param.batch_size",
                     f"expected a positive batch size, got {self.batch_size}")
        self.transformer = DataTransformer(self.layer_param, self._transform_param(),
                                           self.phase)
        if p.force_encoded_color and self.transformer.decode_color is None:
            self.transformer.decode_color = True
        self._prefetcher: _Prefetcher | None = None
        env = self._open_db(p)
        try:
            first, entries = self._read_db(_first_record, env)
            errors.require(entries > 0, self.layer_param, "data_param.source",
                           f"{self.source!r} holds no records", exc=errors.DataError)
            datum_shape = self._first_shape(first)
            c, h, w = self.transformer.setup(datum_shape, self.dtype)
            self.top_shapes = [(self.batch_size, c, h, w), (self.batch_size,)]
            gen = np.random.default_rng(int(self.rng.integers(2**63)))
            skip = int(gen.integers(p.rand_skip)) if p.rand_skip else 0
            self._keys, self.bootstrap_indices = self._read_db(self._bootstrap, env)
            # NOTE: shapes are checked (count <= INT_MAX) before the thread starts reading:
            # a huge batch_size would otherwise read records without end in the background
            self.reshape(bottom, top)
        except BaseException:
            dbm.SharedDB.release(env)
            raise
        self._entries = entries
        self._reader_state = {"pos": skip, "gen": gen.bit_generator.state}
        self._start_prefetch(env)

    def _start_prefetch(self, env: Any) -> None:
        """Start reading at ``self._reader_state`` (record position and generator state)."""
        gen = np.random.default_rng()
        gen.bit_generator.state = self._reader_state["gen"]
        self._prefetcher = _Prefetcher(
            env, self.batch_size, self.transformer, self.dtype, gen, self._reader_state["pos"],
            self._entries, self.bootstrap_indices, self._keys,
            max(1, self.layer_param.data_param.prefetch), self.source,
            getattr(self, "_replica", (0, 1)))
        self._finalizer = weakref.finalize(self, self._prefetcher.stop)

    def set_replica(self, index: int, count: int) -> None:
        """Read only this data-parallel replica's records from now on: record i (counted over
        the whole stream, wrapping included) when ``i mod count == index`` (Caffe's
        ``DataLayer::Skip``). Only TRAIN nets split; TEST nets run on replica 0 and read all."""
        if self.phase != TRAIN or (index, count) == getattr(self, "_replica", (0, 1)):
            return
        self.close()
        self._replica = (int(index), int(count))
        self._start_prefetch(self._open_db(self.layer_param.data_param))

    def get_state(self) -> bytes:
        """The position after the last batch handed out and the random state at that point, so
        a resumed run reads exactly the batches an uninterrupted one would."""
        return json.dumps({"reader": self._reader_state,
                           "rng": self.rng.bit_generator.state}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        self.rng.bit_generator.state = saved["rng"]
        self.close()
        self._reader_state = saved["reader"]
        self._start_prefetch(self._open_db(self.layer_param.data_param))

    def _transform_param(self) -> Any:
        from pycaffe_mpi import upgrade  # nets arrive upgraded; a layer built alone may not

        return upgrade.transform_param_of(self.layer_param)

    def _open_db(self, p: Any) -> Any:
        src = self.source
        hint = ("; run tools/get_cifar10.py to create it" if "cifar10" in src else
                "; run tools/get_fashion_mnist.py to create it" if "fashion_mnist" in src else "")
        self.require(bool(src), "data_param.source", "no source database given")
        errors.require(os.path.exists(src), self.layer_param, "data_param.source",
                       f"{src!r} does not exist{hint}", exc=errors.DataError)
        is_lmdb = dbm.is_lmdb_dir(src)
        if p.backend == LEVELDB and is_lmdb and src not in _warned_leveldb:
            _warned_leveldb.add(src)
            log.warning("%s: data_param.backend is LEVELDB (the default) but %r is an LMDB; "
                        "reading it as LMDB (set backend: LMDB to silence this)",
                        errors.layer_where(self.layer_param), src)
        backend = LMDB if is_lmdb else p.backend
        try:
            return dbm.SharedDB.acquire(src, backend)
        except errors.DataError as e:
            raise errors.DataError(f"{errors.layer_where(self.layer_param, self.location)}, "
                                   f"field data_param.source: {e}") from None

    def _read_db(self, read: Any, env: Any) -> Any:
        """``read(env)``, with a damaged database's errors naming the layer and the source."""
        try:
            return read(env)
        except (*dbm.backend_errors(env), errors.DataError) as e:
            where = errors.layer_where(self.layer_param, self.location)
            raise errors.DataError(f"{where}: reading {self.source!r} failed: the database is "
                                   f"damaged ({e}); rebuild or copy it again") from None

    def _first_shape(self, first: Any) -> tuple[int, ...]:
        """The C×H×W of the first record, decoded as every record will be."""
        color = self.transformer.decode_color
        if not first.encoded and color is not None:
            # Caffe logs this as an error for every record and goes on
            log.warning("%s: force_color and force_gray only apply to encoded Datums; %r holds "
                        "raw ones", errors.layer_where(self.layer_param), self.source)
        try:
            return imgs.decode_datum(first, color).shape
        except errors.DataError as e:
            where = errors.layer_where(self.layer_param, self.location)
            raise errors.DataError(f"{where}: reading {self.source!r} failed: first record: "
                                   f"{e}") from None

    def _bootstrap(self, env: Any) -> tuple[list[bytes] | None, np.ndarray | None]:
        if not self.layer_param.HasField("bootstrap_param"):
            return None, None
        bp = self.layer_param.bootstrap_param
        if not bp.enable:
            return None, None
        with env.begin() as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
        seed = int(bp.seed) if bp.seed >= 0 else int(self.rng.integers(2**31))
        indices = np.random.default_rng(seed + int(bp.member)).integers(0, len(keys), len(keys))
        log.info("%s: bootstrap sample of %d records (seed %d, member %d): %d distinct",
                 errors.layer_where(self.layer_param), len(keys), seed, bp.member,
                 len(np.unique(indices)))
        return keys, indices

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t, shape in zip(top, self.top_shapes):
            t.reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self._prefetcher is None:
            raise errors.DataError(f"{errors.layer_where(self.layer_param)} is closed")
        try:
            (data, labels), self._reader_state = self._prefetcher.next_batch()
        except Exception as e:
            raise errors.DataError(f"{errors.layer_where(self.layer_param)}: reading "
                                   f"{self.source!r} failed: {e}") from e
        for t, arr in zip(top, (data, labels)):
            t.reshape(arr.shape)  # a batch may differ from the first record's shape
            backend_mod.upload(self.xp, arr, t.data)  # a GPU: without waiting for it

    def close(self) -> None:
        """Stop the prefetch thread and close the database (idempotent)."""
        if self._prefetcher is not None:
            self._finalizer()
            self._prefetcher = None


def _decode_batch(datums: list[Any], color: bool | None) -> np.ndarray:
    """Stack the C×H×W arrays of float_data or encoded Datums (one record at a time)."""
    arrays = [imgs.decode_datum(d, color) for d in datums]
    for i, a in enumerate(arrays):
        if a.shape != arrays[0].shape:
            raise errors.DataError(f"record {i} of a batch decodes to shape {a.shape}, the "
                                   f"first to {arrays[0].shape}; set force_color or force_gray "
                                   "or store images of one size")
    return np.stack(arrays)


def _first_record(env: Any) -> tuple[Any, int]:
    """The first Datum of a database (an empty Datum when there is none) and the record count."""
    with env.begin(buffers=False) as txn:
        entries = int(txn.stat()["entries"])
        cur = txn.cursor()
        key, value = (cur.key(), cur.value()) if cur.first() else (b"", b"")
    return _parse_datum(key, value), entries


def _parse_datum(key: bytes, value: bytes | None) -> Any:
    """The Datum stored under ``key``; a missing or garbled record is a DataError naming it."""
    if value is None:
        raise errors.DataError(f"record {key!r} is missing (the key list and the data disagree)")
    try:
        datum = caffe_pb2.Datum.FromString(value)
    except DecodeError as e:
        raise errors.DataError(f"record {key!r} ({len(value)} bytes) is not a valid Datum: "
                               f"{e}") from None
    size = datum.channels * datum.height * datum.width
    if not datum.encoded and len(datum.data) and len(datum.data) != size:
        raise errors.DataError(f"record {key!r} is short: {len(datum.data)} data bytes for "
                               f"{datum.channels}x{datum.height}x{datum.width} = {size}")
    if not datum.encoded and not len(datum.data) and len(datum.float_data) not in (0, size):
        raise errors.DataError(f"record {key!r} is short: {len(datum.float_data)} float_data "
                               f"values for {datum.channels}x{datum.height}x{datum.width} = "
                               f"{size}")
    return datum
