"""docs/pycaffe_example.py runs end to end in a tiny configuration (synthetic data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from google.protobuf import text_format

from pycaffe_mpi.proto import caffe_pb2

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "pycaffe_example.py"


def load_example():
    spec = importlib.util.spec_from_file_location("pycaffe_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_builds_trains_and_classifies(tmp_path, capsys):
    example = load_example()
    result = example.main(["--workdir", str(tmp_path), "--iters", "20", "--batch-size", "8",
                           "--count", "100", "--synthetic", "--classify", "4"])
    out = capsys.readouterr().out
    assert "predicted:" in out and "test accuracy" in out
    # the synthetic classes are easy: 20 iterations already beat chance by far
    assert result["test_accuracy"] >= 0.5 and result["deploy_accuracy"] >= 0.5
    for name in ("lenet_train.prototxt", "lenet_test.prototxt", "lenet_deploy.prototxt",
                 "lenet_solver.prototxt", "lenet.caffemodel", "test_0.png"):
        assert (tmp_path / name).is_file(), name
    deploy = text_format.Parse((tmp_path / "lenet_deploy.prototxt").read_text(),
                               caffe_pb2.NetParameter())
    assert [lp.type for lp in deploy.layer] == ["Input", "Convolution", "Pooling", "Convolution",
                                                "Pooling", "InnerProduct", "ReLU",
                                                "InnerProduct", "Softmax"]
