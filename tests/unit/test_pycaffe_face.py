"""``import pycaffe_mpi as caffe`` and the ``caffe`` module Python layers see are one face."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import pycaffe_mpi
from pycaffe_mpi import backend, errors, pycaffe

# every name of BVLC's python/caffe/__init__.py that pycaffe-mpi provides
PYCAFFE_NAMES = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
                 "AdaDeltaSolver", "AdamSolver", "set_mode_cpu", "set_mode_gpu", "set_device",
                 "Layer", "get_solver", "layer_type_list", "set_random_seed", "TRAIN", "TEST",
                 "Classifier", "Detector", "io", "layers", "params", "NetSpec", "to_proto"]


@pytest.mark.parametrize("name", PYCAFFE_NAMES)
def test_package_and_caffe_module_give_the_same_object(name):
    assert getattr(pycaffe_mpi, name) is getattr(pycaffe, name)


def test_names_come_from_their_owners():
    from pycaffe_mpi import classifier, net, net_spec, solvers

    assert pycaffe_mpi.Net is net.Net
    assert pycaffe_mpi.get_solver is solvers.get_solver
    assert pycaffe_mpi.SGDSolver is solvers.SGDSolver
    assert pycaffe_mpi.NetSpec is net_spec.NetSpec and pycaffe_mpi.layers is net_spec.layers
    assert pycaffe_mpi.params is net_spec.params and pycaffe_mpi.to_proto is net_spec.to_proto
    assert pycaffe_mpi.Classifier is classifier.Classifier
    assert pycaffe_mpi.Detector is classifier.Detector
    assert (pycaffe_mpi.TRAIN, pycaffe_mpi.TEST) == (0, 1)
    from pycaffe_mpi import layers as L
    from pycaffe_mpi import params as P

    assert L is net_spec.layers and P is net_spec.params
    assert set(PYCAFFE_NAMES) <= set(dir(pycaffe_mpi)) and set(PYCAFFE_NAMES) <= set(dir(pycaffe))


def test_missing_pycaffe_names_say_so():
    for module, owner in ((pycaffe_mpi, "pycaffe_mpi"), (pycaffe, "caffe")):
        with pytest.raises(AttributeError, match=rf"{owner}\.NCCL is not provided"):
            module.NCCL  # noqa: B018


def test_mode_setters_share_one_settings_object(monkeypatch):
    fresh = pycaffe.Settings()
    monkeypatch.setattr(pycaffe, "settings", fresh)
    assert pycaffe_mpi.settings is fresh
    pycaffe_mpi.set_random_seed(7)
    assert pycaffe.settings.random_seed == 7
    pycaffe_mpi.set_mode_cpu()
    assert fresh.mode == "cpu" and fresh.backend() is backend.CPU
    if not backend.gpu_available():
        with pytest.raises(errors.PycaffeError, match="no usable GPU"):
            pycaffe_mpi.set_mode_gpu()
        with pytest.raises(errors.PycaffeError, match="no usable GPU"):
            pycaffe_mpi.set_device(0)
        assert fresh.mode == "cpu"


def test_import_stays_lazy():
    code = textwrap.dedent("""
        import sys
        import pycaffe_mpi as caffe
        heavy = ['pycaffe_mpi.net', 'pycaffe_mpi.solvers', 'pycaffe_mpi.net_spec',
                 'pycaffe_mpi.classifier', 'PIL']
        print([m for m in heavy if m in sys.modules])
        caffe.NetSpec
        print('pycaffe_mpi.net_spec' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True"]
