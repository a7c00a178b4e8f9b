"""No layer waits for the device inside an iteration (without a GPU).

Each layer case runs forward and backward on a stand-in device: an array module named "cupy"
whose arrays are NumPy arrays of a subclass that records every read of a value into Python
(``float()``, ``int()``, ``bool()``, ``.item()``, ``.tolist()``): on a GPU each such read waits
for every kernel queued before it. The CUDA kernels run through the host stand-in of
conftest.py. A layer type that reads values in forward or backward must be listed in
``KNOWN_SYNCS`` with the reason; a new one fails here.
"""

from __future__ import annotations

import traceback
import types
from typing import Any

import numpy as np
import pytest

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi.testing import layer_cases
from pycaffe_mpi.testing.layer_cases import build_layer, make_bottoms

# Layer types that read device values in forward/backward today, and why (a GPU pays a pipeline
# stall for each). Data layers fill their tops on the host by design.
KNOWN_SYNCS = {
    "Accuracy": "count and hits read for the division (TEST phase)",
    "EnsembleAccuracy": "per-class counts kept on the host (TEST phase)",
    "InfogainLoss": "the valid count read as an int",
    "SigmoidCrossEntropyLoss": "the valid count with ignore_label read as an int",
    "Embed": "index range and integrality checks (utility._indices)",
    "BatchReindex": "index range check (utility._indices)",
}


class PendingFlag:
    """backend.LateFlag as on a GPU whose copy has not arrived yet (no value, no wait)."""

    def __init__(self, xp: Any, flag: Any) -> None:
        pass

    def value(self) -> None:
        return None


_ACTIVE = [False]
SYNCS: list[str] = []


def _record(what: str) -> None:
    if _ACTIVE[0]:
        frame = next(f for f in reversed(traceback.extract_stack())
                     if not f.filename.endswith("test_host_syncs.py"))
        SYNCS.append(f"{what} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")


class DeviceArray(np.ndarray):
    """A NumPy array that records reads of its values into Python."""

    def __float__(self) -> float:
        _record("float()")
        return float(np.asarray(self))

    def __int__(self) -> int:
        _record("int()")
        return int(np.asarray(self))

    def __bool__(self) -> bool:
        _record("bool()")
        return bool(np.asarray(self))

    def __index__(self) -> int:
        _record("index")
        return np.asarray(self).__index__()

    def item(self, *args: Any) -> Any:
        _record(".item()")
        return np.asarray(self).item(*args)

    def tolist(self) -> Any:
        _record(".tolist()")
        return np.asarray(self).tolist()

    def set(self, host: Any, stream: Any = None) -> None:  # CuPy's host-to-device copy
        self[...] = host


def _wrap(out: Any) -> Any:
    if isinstance(out, np.ndarray) and not isinstance(out, DeviceArray):
        return out.view(DeviceArray)
    if isinstance(out, tuple):
        return tuple(_wrap(o) for o in out)
    return out


class _Module(types.ModuleType):
    """``numpy`` under the name ``cupy``, every array it returns a :class:`DeviceArray`."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            def call(*args: Any, **kwargs: Any) -> Any:
                return _wrap(attr(*args, **kwargs))
            return call
        return attr


FAKE = _Module("cupy")


class _Event:
    def __init__(self) -> None:
        self.done, self.waited = False, False

    def synchronize(self) -> None:
        self.waited = self.done = True


EVENTS: list[_Event] = []


def _record_event() -> _Event:
    EVENTS.append(_Event())
    return EVENTS[-1]


FAKE.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
    get_current_stream=lambda: types.SimpleNamespace(record=_record_event))


def _device() -> backend_mod.Backend:
    b = backend_mod.Backend()
    b.xp = FAKE
    return b


SKIP = {"Python", "Data", "HDF5Data", "ImageData", "WindowData", "MemoryData", "HDF5Output"}
CASES = [c for c in layer_cases.all_cases() if c.type not in SKIP]


@pytest.mark.parametrize("case", CASES, ids=[c.test_id for c in CASES])
def test_no_host_reads_in_forward_or_backward(case, cuda_standin, monkeypatch):
    monkeypatch.setattr(backend_mod, "LateFlag", PendingFlag)
    monkeypatch.setattr(backend_mod, "pinned_empty", np.empty)
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    layer, bb, tb = build_layer(case, bottoms, np.float32, backend=_device())
    for t in tb:
        t.diff[...] = FAKE.ones(t.shape, np.float32)
    SYNCS.clear()
    _ACTIVE[0] = True
    try:
        layer.forward(bb, tb)
        if case.grad:
            checked = [i for i in range(len(bb)) if layer.allow_force_backward(i)]
            if case.grad_bottoms is not None:
                checked = list(case.grad_bottoms)
            layer.backward(tb, [i in checked for i in range(len(bb))], bb)
    finally:
        _ACTIVE[0] = False
    if case.type in KNOWN_SYNCS:
        return
    assert not SYNCS, (f"{case.type} reads device values during forward/backward (a GPU "
                       f"waits at each): {sorted(set(SYNCS))[:5]}")


def test_a_bad_label_is_reported_once_its_flag_arrives(monkeypatch):
    """On a GPU the label range check of loss.labels fails a batch or two late, not never."""
    from pycaffe_mpi import errors
    from pycaffe_mpi.layer_types import loss as loss_mod

    arrived: list[bool] = []

    class LateByOne:
        def __init__(self, xp: Any, flag: Any) -> None:
            self.flag, self.checked = bool(np.asarray(flag)), False

        def value(self) -> bool | None:
            if not self.checked:  # the device has not reached it on the first look
                self.checked = True
                return None
            arrived.append(self.flag)
            return self.flag

    monkeypatch.setattr(backend_mod, "LateFlag", LateByOne)
    case = next(c for c in CASES if c.type == "MultinomialLogisticLoss")
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    layer, bb, _ = build_layer(case, bottoms, np.float32, backend=_device())
    shape, classes = (bb[1].count,), bb[0].shape[1]
    loss_mod.labels(layer, bb[1], shape, classes, None)
    bb[1].data[...] = 99  # out of range from now on
    loss_mod.labels(layer, bb[1], shape, classes, None)  # queued, not yet seen
    with pytest.raises(errors.NetError, match="label outside"):
        loss_mod.labels(layer, bb[1], shape, classes, None)
    assert arrived == [False, True]


def test_the_nonfinite_guard_waits_for_no_device_loss(monkeypatch):
    """A device loss is checked late (backend.LateFlag), not read every pass."""
    from pycaffe_mpi.solvers import nonfinite

    flags: list[Any] = []

    class Late:
        def __init__(self, xp: Any, flag: Any) -> None:
            self.flag, self.arrived = flag, False
            flags.append(self)

        def value(self) -> bool | None:
            return bool(np.asarray(self.flag)) if self.arrived else None

    monkeypatch.setattr(backend_mod, "LateFlag", Late)
    guard = nonfinite.LossGuard("stop")
    net = types.SimpleNamespace(layers=[], layer_need_backward=[])
    SYNCS.clear()
    _ACTIVE[0] = True
    try:
        guard.check(net, FAKE.asarray(np.float32(1.5)), 0)
        guard.check(net, FAKE.asarray(np.float32(np.nan)), 1)
    finally:
        _ACTIVE[0] = False
    assert not SYNCS
    for f in flags:
        f.arrived = True
    with pytest.raises(nonfinite.NonFiniteError, match="iteration 2"):
        guard.check(net, FAKE.asarray(np.float32(2.0)), 2)


def test_uploads_go_through_a_ring_of_pinned_buffers(monkeypatch):
    allocated: list[tuple[int, ...]] = []

    def pinned(shape: Any, dtype: Any) -> np.ndarray:
        allocated.append(tuple(shape))
        return np.empty(shape, dtype)

    monkeypatch.setattr(backend_mod, "pinned_empty", pinned)
    up = backend_mod.Uploader(slots=2)
    EVENTS.clear()
    outs = [up(FAKE, np.full((2, 3), float(i))) for i in range(2)]
    assert [float(np.asarray(o)[0, 0]) for o in outs] == [0.0, 1.0]
    assert len(allocated) == 2 and not any(e.waited for e in EVENTS)
    out = FAKE.zeros((2, 3))
    up(FAKE, np.full((2, 3), 7), out)  # both copies still in flight: wait for one
    assert float(np.asarray(out)[1, 2]) == 7.0
    assert len(allocated) == 2 and EVENTS[0].waited
    EVENTS[1].done = True
    up(FAKE, np.ones((2, 3)))  # a finished slot is reused without waiting
    assert len(allocated) == 2 and not EVENTS[1].waited
    assert np.array_equal(up(np, np.arange(3)), np.arange(3))  # off CuPy: a conversion
