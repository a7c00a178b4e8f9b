"""Run-time trust in the Net (issue 9 items 2, 4, 6): clear errors instead of raw tracebacks.

- a user's Python layer that raises: a line naming the layer, its type and class, file:line (and
  the rank under MPI), then the user's own traceback; the error still is the user's exception
  type for pycaffe code that catches it; ``sys.exit`` in a layer becomes such an error;
- duplicate layer names give the places of both; a top named like an automatic split blob is
  refused;
- ``--weights`` that copy no layer (an empty file, a mean .binaryproto) or bring NaN warn loudly,
  naming the file;
- ``sys.exit`` in the data prefetch thread reaches ``forward`` as a DataError.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import datasets, errors
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.layer_types import data as data_layers
from pycaffe_mpi.layer_types import python as python_layer
from pycaffe_mpi.net import Net

MODULE = "_pycaffe_mpi_trust_net_layers"


class Grumpy(Layer):
    """Identity whose ``param_str`` says where it fails: "setup", "forward", "backward",
    "exit" (sys.exit(5) in forward)."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.param_str == "setup":
            raise KeyError("no such thing")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.param_str == "forward":
            self._explode()
        if self.param_str == "exit":
            sys.exit(5)
        top[0].data[...] = bottom[0].data

    def _explode(self) -> None:
        raise ValueError("bad value in forward")

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if self.param_str == "backward":
            raise ZeroDivisionError("nothing to divide")


sys.modules[MODULE] = types.ModuleType(MODULE)
sys.modules[MODULE].Grumpy = Grumpy  # type: ignore[attr-defined]

BASE = """name: "n"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
"""


def grumpy_net(tmp_path: Path, where: str) -> Path:
    path = tmp_path / "grumpy.prototxt"
    path.write_text("force_backward: true\n" + BASE + f"""layer {{ name: "g" type: "Python"
  bottom: "x" top: "y"
  python_param {{ module: "{MODULE}" layer: "Grumpy" param_str: "{where}" }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "x" top: "loss" }}
""")
    return path


@pytest.mark.parametrize(("where", "kind", "method"), [
    ("setup", KeyError, "setup"), ("forward", ValueError, "forward"),
    ("backward", ZeroDivisionError, "backward")])
def test_user_layer_error_names_layer_and_shows_user_traceback(
        tmp_path: Path, where: str, kind: type, method: str) -> None:
    path = grumpy_net(tmp_path, where)
    with pytest.raises(errors.NetError) as info:
        net = Net(str(path), 0)
        net.forward_backward()
    e = info.value
    assert isinstance(e, kind)  # pycaffe code catching the user's exception type still works
    head, *tb = str(e).splitlines()
    assert head.startswith(f'{path}:4: layer "g" (type Python), class '
                           f"{Grumpy.__module__}.Grumpy: raised {kind.__name__} in {method}"), head
    assert tb[0] == "Traceback (most recent call last):", tb
    assert all("pycaffe_mpi" not in ln for ln in tb if ln.lstrip().startswith("File")), tb
    assert any(__file__ in ln for ln in tb), tb
    assert tb[-1].startswith(kind.__name__), tb


def test_sys_exit_in_a_layer_is_an_error(tmp_path: Path) -> None:
    net = Net(str(grumpy_net(tmp_path, "exit")), 0)
    with pytest.raises(errors.NetError, match=r'layer "g" .*called sys.exit\(5\) in forward'):
        net.forward_loss()


def test_error_class_falls_back_for_incompatible_types(tmp_path: Path) -> None:
    layer = Net(str(grumpy_net(tmp_path, "none")), 0).layer_dict["g"]
    err = python_layer.user_layer_error(
        layer, "forward", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"))
    assert type(err) is errors.NetError  # its constructor wants five arguments
    assert python_layer._error_class(errors.DataError("x")) is errors.NetError
    assert issubclass(python_layer._error_class(RuntimeError("x")), RuntimeError)


def test_builtin_layer_errors_are_untouched(tmp_path: Path) -> None:
    """Only user code is wrapped: the framework's own errors keep their type and text."""
    path = tmp_path / "n.prototxt"
    path.write_text(BASE + 'layer { name: "r" type: "Reshape" bottom: "x" top: "y" '
                           "reshape_param { shape { dim: 5 } } }\n")
    with pytest.raises(errors.PycaffeError) as info:
        Net(str(path), 0)
    assert "Traceback" not in str(info.value)


# -- names ------------------------------------------------------------------------------------
def test_duplicate_layer_names_give_both_places(tmp_path: Path) -> None:
    path = tmp_path / "dup.prototxt"
    path.write_text(BASE + 'layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
                           'layer { name: "a" type: "Sigmoid" bottom: "y" top: "z" }\n')
    with pytest.raises(errors.NetError,
                       match=rf'{path}:4: layer "a" \(type Sigmoid\): duplicate layer name "a": '
                             rf"also the name of layer #1 \(type ReLU\) at {path}:3"):
        Net(str(path), 0)


def test_layers_of_one_name_in_different_phases_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "phases.prototxt"
    path.write_text(BASE + 'layer { name: "a" type: "ReLU" bottom: "x" top: "y" '
                           "include { phase: TRAIN } }\n"
                           'layer { name: "a" type: "Sigmoid" bottom: "x" top: "y" '
                           "include { phase: TEST } }\n")
    assert Net(str(path), 1).layer_dict["a"].type == "Sigmoid"


def test_top_named_like_a_split_blob(tmp_path: Path) -> None:
    path = tmp_path / "split.prototxt"
    path.write_text(BASE + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x_in_0_split_1" }\n')
    with pytest.raises(errors.NetError, match=rf'{path}:3: layer "r" \(type ReLU\): top '
                                              r'"x_in_0_split_1" is named like a blob'):
        Net(str(path), 0)
    # a net written out after its splits were inserted (Net.to_proto) builds again
    fan = tmp_path / "fan.prototxt"
    fan.write_text(BASE + 'layer { name: "a" type: "ReLU" bottom: "x" top: "a" }\n'
                          'layer { name: "b" type: "ReLU" bottom: "x" top: "b" }\n')
    built = Net(str(fan), 0)
    assert any(lp.type == "Split" for lp in built.to_proto().layer)
    Net(built.to_proto(), 0)


# -- weights ----------------------------------------------------------------------------------
def ip_net(tmp_path: Path) -> Path:
    path = tmp_path / "ip.prototxt"
    path.write_text(BASE + 'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                           'inner_product_param { num_output: 2 weight_filler { type: "gaussian" '
                           "std: 1 } } }\n")
    return path


def test_weights_that_copy_nothing_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    mean = tmp_path / "mean.binaryproto"
    io.write_binaryproto(str(mean), np.ones((1, 3, 2, 2), np.float32))
    net = Net(str(ip_net(tmp_path)), 0, seed=1)
    before = net.params["ip"][0].data.copy()
    for path in (empty, mean):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pycaffe_mpi"):
            try:
                net.copy_trained_layers_from(str(path))
            except errors.PycaffeError as e:  # unreadable as a net: an error naming the file
                assert str(path) in str(e)
                continue
        assert f"WEIGHTS NOT LOADED: {path} copied no layer" in caplog.text, caplog.text
        assert "'ip'" in caplog.text
    np.testing.assert_array_equal(net.params["ip"][0].data, before)


def test_nonfinite_weights_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = Net(str(ip_net(tmp_path)), 0, seed=1)
    net.params["ip"][1].data[0] = np.nan
    bad = tmp_path / "bad.caffemodel"
    net.save(str(bad))
    with caplog.at_level(logging.WARNING, logger="pycaffe_mpi"):
        Net(str(ip_net(tmp_path)), 0, weights=str(bad))
    assert f"NON-FINITE WEIGHTS: {bad} brought NaN or Inf values into layer(s) ['ip']" \
        in caplog.text
    assert "WEIGHTS NOT LOADED" not in caplog.text


# -- the prefetch thread ------------------------------------------------------------------------
def test_sys_exit_in_prefetch_thread_reaches_forward(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "db"
    datasets.write_datum_lmdb(db, np.zeros((4, 1, 2, 2), np.uint8), np.arange(4))

    def leave(self: object, records: object) -> None:
        sys.exit(7)

    monkeypatch.setattr(data_layers._Prefetcher, "_batch", leave)
    path = tmp_path / "data.prototxt"
    path.write_text(f'layer {{ name: "d" type: "Data" top: "x" top: "y" data_param {{ '
                    f'source: "{db}" batch_size: 2 backend: LMDB }} }}\n')
    net = Net(str(path), 0)
    try:
        with pytest.raises(errors.DataError, match=r'layer "d".*sys.exit\(7\) in the prefetch '
                                                   "thread"):
            net.forward_loss()
    finally:
        net.close()


class ExitsInInit(Layer):
    def __init__(self, param: object) -> None:
        sys.exit("no")


sys.modules[MODULE].ExitsInInit = ExitsInInit  # type: ignore[attr-defined]


def test_sys_exit_in_init_and_at_import_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "init.prototxt"
    path.write_text(BASE + f'layer {{ name: "e" type: "Python" bottom: "x" top: "y" '
                           f'python_param {{ module: "{MODULE}" layer: "ExitsInInit" }} }}\n')
    with pytest.raises(errors.NetError, match=r"init.prototxt:3: layer \"e\" .*called "
                                              r"sys.exit\('no'\) in __init__"):
        Net(str(path), 0)
    mod = tmp_path / "leaving_module.py"
    mod.write_text("import sys\nsys.exit(9)\n")
    path.write_text(BASE + 'layer { name: "e" type: "Python" bottom: "x" top: "y" '
                           'python_param { module: "leaving_module" layer: "X" } }\n')
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(errors.NetError, match=r'importing python_param\.module '
                                                  r'"leaving_module" failed: SystemExit: 9'):
            Net(str(path), 0)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("leaving_module", None)
