"""``type: "Python"`` layers: BVLC pycaffe user code run unchanged, and the ``caffe`` stand-in."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import backend, errors, layer, registry
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer_types import python as python_layer
from pycaffe_mpi.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[2]
PYLAYERS = REPO / "tests" / "data" / "pylayers"


@pytest.fixture(autouse=True)
def _pylayers_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(PYLAYERS))


def make(cls_name: str, module: str = "bvlc_test_layers", param_str: str = "",
         name: str = "pylayer", **kwargs):
    p = caffe_pb2.LayerParameter(name=name, type="Python")
    p.python_param.module = module
    p.python_param.layer = cls_name
    p.python_param.param_str = param_str
    return registry.layer_class("Python")(p, **kwargs)


def run(lay, bottoms, ntop=1):
    tops = [Blob((), lay.dtype) for _ in range(ntop)]
    lay.setup(bottoms, tops)
    lay.reshape(bottoms, tops)
    lay.forward(bottoms, tops)
    return tops


def _net(text: str, phase: int = layer.TRAIN):
    from pycaffe_mpi import net as net_mod

    param = text_format.Parse(text, caffe_pb2.NetParameter())
    return net_mod.Net(param, phase)


# -- BVLC's test_python_layer.py ---------------------------------------------------------------


def test_three_chained_times_ten_layers_from_layer_objects():
    """8 → 8000 forward through three ×10 layers; top diff 7 → 7000 backward."""
    blobs = [Blob((10, 9, 8), np.float32) for _ in range(4)]
    blobs[0].data[...] = 8
    layers = [make("SimpleLayer", name=n) for n in ("one", "two", "three")]
    for i, lay in enumerate(layers):
        lay.setup([blobs[i]], [blobs[i + 1]])
        lay.reshape([blobs[i]], [blobs[i + 1]])
        lay.forward([blobs[i]], [blobs[i + 1]])
    assert blobs[3].shape == (10, 9, 8)
    assert np.all(blobs[3].data == 8000)
    blobs[3].diff[...] = 7
    for i, lay in reversed(list(enumerate(layers))):
        lay.backward([blobs[i + 1]], [True], [blobs[i]])
    assert np.all(blobs[0].diff == 7000)


_CHAIN = """
layer { type: 'Python' name: 'one' bottom: 'data' top: 'one'
  python_param { module: 'bvlc_test_layers' layer: 'SimpleLayer' } }
layer { type: 'Python' name: 'two' bottom: 'one' top: 'two'
  python_param { module: 'bvlc_test_layers' layer: 'SimpleLayer' } }
layer { type: 'Python' name: 'three' bottom: 'two' top: 'three'
  python_param { module: 'bvlc_test_layers' layer: 'SimpleLayer' } }
"""


def test_three_chained_times_ten_layers_through_a_net_with_a_python_data_layer():
    net = _net("name: 'pythonnet' force_backward: true\n"
               "layer { type: 'Python' name: 'data' top: 'data' python_param { "
               "module: 'bvlc_test_layers' layer: 'ConstantSource' param_str: '10 9 8' } }"
               + _CHAIN)
    out = net.forward()
    assert np.all(out["three"] == 8000)
    net.blobs["three"].diff[...] = 7
    net.backward()
    assert np.all(net.blobs["data"].diff == 7000)
    assert [type(lay).__name__ for lay in net.layers] == ["ConstantSource"] + ["SimpleLayer"] * 3
    assert all(lay.type == "Python" for lay in net.layers)


def test_three_chained_times_ten_layers_bvlc_net_file():
    """The classic chained net, declared with legacy ``input:`` fields."""
    net = _net("name: 'pythonnet' force_backward: true\n"
               "input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }" + _CHAIN)
    net.blobs["data"].data[...] = 8
    net.forward()
    assert np.all(net.blobs["three"].data == 8000)
    net.blobs["three"].diff[...] = 7
    net.backward()
    assert np.all(net.blobs["data"].diff == 7000)


def test_parameter_layer_in_a_net_and_saved_weights(tmp_path):
    """BVLC's test_parameter: a learnable blob made with self.blobs.add_blob, saved, loaded."""
    net = _net("name: 'pythonnet' force_backward: true\n"
               "layer { type: 'Python' name: 'data' top: 'data' python_param { "
               "module: 'bvlc_test_layers' layer: 'ConstantSource' param_str: '10 9 8' } }\n"
               "layer { type: 'Python' name: 'layer' bottom: 'data' top: 'top' "
               "python_param { module: 'bvlc_test_layers' layer: 'ParameterLayer' } }")
    net.forward()
    net.backward()
    lay = net.layer_dict["layer"]
    assert lay.blobs[0].data[0] == 0
    assert lay.blobs[0].diff[0] == 1
    lay.blobs[0].data[0] += lay.blobs[0].diff[0]
    assert list(net.params) == ["layer"]
    path = tmp_path / "p.caffemodel"
    net.save(str(path))
    lay.blobs[0].data[0] = -1
    net.copy_from(str(path))
    assert lay.blobs[0].data[0] == 1


@pytest.mark.parametrize("phase", [layer.TRAIN, layer.TEST])
def test_phase_is_set_before_setup(phase):
    lay = make("PhaseLayer", phase=phase)
    assert lay.phase == phase
    top = run(lay, [])[0]
    assert top.shape == () and float(top.data) == phase
    net = _net("layer { name: 'layer' type: 'Python' top: 'phase' "
               "python_param { module: 'bvlc_test_layers' layer: 'PhaseLayer' } }", phase)
    assert float(net.forward()["phase"]) == phase


def test_exception_in_setup_reaches_the_caller():
    lay = make("ExceptionLayer")
    with pytest.raises(RuntimeError):
        lay.setup([], [Blob()])
    with pytest.raises(RuntimeError):
        _net("layer { type: 'Python' name: 'layer' top: 'x' "
             "python_param { module: 'bvlc_test_layers' layer: 'ExceptionLayer' } }")


# -- param_str ---------------------------------------------------------------------------------


def test_param_str_float_bvlc_with_param_str():
    """BVLC's test_python_layer_with_param_str: param_str "10" read as a float."""
    lay = make("SimpleParamLayer", param_str="10")
    assert lay.param_str == "10"
    x = Blob((2, 3))
    x.data[...] = np.arange(6).reshape(2, 3)
    top = run(lay, [x])[0]
    np.testing.assert_allclose(top.data, 10 * x.data)
    top.diff[...] = 1
    lay.backward([top], [True], [x])
    np.testing.assert_allclose(x.diff, 10)


def test_param_str_json_parsed_by_the_user_layer():
    lay = make("JsonScaleLayer", param_str='{"scale": 2.5, "shift": -1}')
    x = Blob((4,))
    x.data[...] = [0, 1, 2, 3]
    np.testing.assert_allclose(run(lay, [x])[0].data, [-1, 1.5, 4, 6.5])
    ten = make("TimesTenLayer", "pycaffe_mpi.testing.pylayers", '{"multiplier": 3}')
    np.testing.assert_allclose(run(ten, [x])[0].data, [0, 3, 6, 9])


# -- construction contract ---------------------------------------------------------------------


def test_factory_returns_the_users_class_with_layer_init_applied():
    lay = make("SimpleLayer", phase=layer.TEST, dtype=np.float64)
    import bvlc_test_layers
    import caffe

    assert type(lay) is bvlc_test_layers.SimpleLayer
    assert isinstance(lay, layer.Layer) and caffe.Layer is layer.Layer
    assert lay.type == "Python" and lay.name == "pylayer"
    assert lay.phase == layer.TEST and lay.dtype == np.float64
    assert lay.blobs == [] and lay.blobs.add_blob(2, 3).dtype == np.float64
    assert not lay.is_loss  # a Python top gets a loss weight only when the prototxt gives one
    assert lay.xp is backend.CPU.xp


def test_user_init_chaining_to_the_base_keeps_the_nets_settings():
    rng = np.random.default_rng(5)
    lay = make("InitLayer", phase=layer.TEST, dtype=np.float64, rng=rng)
    assert lay.extra == 5 and lay.phase == layer.TEST and lay.dtype == np.float64
    assert lay.rng is rng


def test_loss_weight_only_when_declared():
    src = ("layer { type: 'Python' name: 'a' top: 'a' python_param { "
           "module: 'bvlc_test_layers' layer: 'ConstantSource' param_str: '2 3' } }\n"
           "layer { type: 'Python' name: 'b' bottom: 'a' top: 'b' python_param { "
           "module: 'bvlc_test_layers' layer: 'JsonScaleLayer' param_str: '{\"scale\": 0.5}' } }\n"
           "layer { type: 'Python' name: 'loss' bottom: 'a' bottom: 'b' top: 'loss' {lw} "
           "python_param { module: 'pyloss' layer: 'EuclideanLossLayer' } }")
    net = _net(src.replace("{lw}", ""))
    assert net.blob_loss_weights["loss"] == 0
    net = _net(src.replace("{lw}", "loss_weight: 1"))
    assert net.blob_loss_weights["loss"] == 1
    assert net.forward_loss() == pytest.approx(6 * (8 - 4) ** 2 / 2 / 2)


# -- errors ------------------------------------------------------------------------------------


def test_missing_module_names_layer_module_and_import_error():
    with pytest.raises(errors.NetError) as e:
        make("X", module="no_such_pylayer_module", name="mylayer")
    msg = str(e.value)
    assert 'layer "mylayer"' in msg and "no_such_pylayer_module" in msg
    assert "No module named" in msg and "PYTHONPATH" in msg


def test_module_failing_on_import_is_reported():
    with pytest.raises(errors.NetError, match=r"broken_layers.*no_such_dependency_for_pycaffe"):
        make("X", module="broken_layers")


def test_missing_class_suggests_the_nearest_layer_class():
    with pytest.raises(errors.NetError, match=r'no class "SimpleLayr"; did you mean "SimpleLayer"'):
        make("SimpleLayr", name="mylayer")
    with pytest.raises(errors.NetError, match=r"layer classes in it: .*SimpleParamLayer"):
        make("Zzzzz")
    with pytest.raises(errors.NetError, match=r"python_param\.module"):
        make("SimpleLayer", module="")


def test_class_that_is_not_a_layer_is_refused():
    with pytest.raises(errors.NetError, match=r"not a subclass of caffe\.Layer"):
        make("NotALayer")
    with pytest.raises(errors.NetError, match="helper_array\" is not a subclass"):
        make("helper_array")


# -- the caffe stand-in module -----------------------------------------------------------------


def test_import_caffe_in_a_subprocess_without_another_caffe():
    """A BVLC module doing ``import caffe`` works from its own directory, nothing installed."""
    script = textwrap.dedent("""
        import importlib.util, os, sys
        if importlib.util.find_spec("caffe") is not None:
            print("SKIP another caffe is importable"); sys.exit(0)
        # the factory itself must make the working directory importable
        sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
        import numpy as np
        from pycaffe_mpi import registry
        from pycaffe_mpi.blob import Blob
        from pycaffe_mpi.proto import caffe_pb2
        p = caffe_pb2.LayerParameter(name="ten", type="Python")
        p.python_param.module = "bvlc_test_layers"
        p.python_param.layer = "SimpleLayer"
        lay = registry.layer_class("Python")(p)
        import caffe, caffe.proto.caffe_pb2
        import pycaffe_mpi.layer, pycaffe_mpi.pycaffe
        from caffe.proto import caffe_pb2 as pb
        assert caffe is pycaffe_mpi.pycaffe and pb is caffe_pb2
        assert type(lay).__name__ == "SimpleLayer" and isinstance(lay, caffe.Layer)
        assert caffe.Layer is pycaffe_mpi.layer.Layer
        x, y = Blob((2, 2)), Blob()
        x.data[...] = 8
        lay.setup([x], [y]); lay.reshape([x], [y]); lay.forward([x], [y])
        assert (y.data == 80).all()
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", script], cwd=PYLAYERS, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.stdout.strip() == "OK"


def test_pycaffe_module_surface(monkeypatch):
    from pycaffe_mpi import pycaffe

    assert pycaffe.Layer is layer.Layer
    assert (pycaffe.TRAIN, pycaffe.TEST) == (0, 1)
    assert "Python" in pycaffe.layer_type_list() and "SoftmaxWithLoss" in pycaffe.layer_type_list()
    assert pycaffe.proto.caffe_pb2 is caffe_pb2
    if importlib.util.find_spec("pycaffe_mpi.net") is not None:
        import pycaffe_mpi.net

        assert pycaffe.Net is pycaffe_mpi.net.Net
    import pycaffe_mpi.io

    assert pycaffe.io is pycaffe_mpi.io
    import pycaffe_mpi.net_spec

    assert pycaffe.NetSpec is pycaffe_mpi.net_spec.NetSpec
    with pytest.raises(AttributeError, match="not provided by pycaffe-mpi"):
        pycaffe.NCCL  # noqa: B018
    monkeypatch.setattr(pycaffe, "settings", pycaffe.Settings())
    pycaffe.set_random_seed(42)
    pycaffe.set_mode_cpu()
    assert pycaffe.settings.random_seed == 42 and pycaffe.settings.mode == "cpu"
    assert pycaffe.settings.backend() is backend.CPU
    if not backend.gpu_available():
        with pytest.raises(errors.PycaffeError, match="no usable GPU"):
            pycaffe.set_mode_gpu()
        with pytest.raises(errors.PycaffeError, match="no usable GPU"):
            pycaffe.set_device(0)
        assert pycaffe.settings.mode == "cpu"


def test_caffe_alias_is_installed_only_without_another_caffe():
    from pycaffe_mpi import pycaffe

    if sys.modules.get("caffe") not in (None, pycaffe):
        pytest.skip("another caffe is imported")
    assert python_layer.install_caffe_alias() is True
    assert sys.modules["caffe"] is pycaffe
    assert sys.modules["caffe.proto.caffe_pb2"] is caffe_pb2
