"""The CPU benchmark's nets build, their PyTorch twins match them, and the bench runs.

PyTorch is an optional baseline of ``bench/bench_cpu.py``: the twin tests skip cleanly when it
does not import, and one run proves the bench works (and says so) without it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi.net import Net
from pycaffe_mpi.testing import zoo

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import bench_cpu  # noqa: E402

# (name, builder at a small size) for every bench net; ResNet-50 needs 224 for its 7x7 pool5.
SMALL = {
    "quick": lambda: bench_cpu.NETS["quick"].build(2),
    "nin": lambda: bench_cpu.NETS["nin"].build(2),
    "resnet50": lambda: zoo.resnet50(batch=1, size=224, loss=True),
    "mobilenet_v1": lambda: zoo.mobilenet_v1(batch=2, size=32, loss=True),
}
RUN_TWIN = ("quick", "nin", "mobilenet_v1")  # ResNet-50's forward is too slow for a unit test


def test_every_bench_net_has_a_small_variant() -> None:
    assert set(SMALL) == set(bench_cpu.NETS)


def test_parse_nets() -> None:
    assert bench_cpu.parse_nets("quick,resnet50@4") == [("quick", 100), ("quick", 350),
                                                        ("resnet50", 4)]
    assert bench_cpu.parse_nets("nin@2+3") == [("nin", 2), ("nin", 3)]
    with pytest.raises(SystemExit, match="unknown net"):
        bench_cpu.parse_nets("vgg")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_net_builds_and_gemm_floor_counts_its_products(name: str) -> None:
    param = SMALL[name]()
    net = Net(param, 0, seed=1)
    try:
        shapes = bench_cpu.quick.gemm_shapes(net)
        convs = {n for n, layer in zip(net.layer_names, net.layers)
                 if layer.type in ("Convolution", "InnerProduct")}
        assert {s[0] for s in shapes} == convs
        assert bench_cpu.quick.gemm_flops(shapes) > 0
    finally:
        net.close()


def test_nin_shapes_are_cifar100s() -> None:
    net = Net(bench_cpu.NETS["nin"].build(2), 0, seed=1)
    try:
        assert net.blobs["conv1"].shape == (2, 192, 32, 32)
        assert net.blobs["pool1"].shape == (2, 96, 16, 16)
        assert net.blobs["pool2"].shape == (2, 192, 8, 8)
        assert net.blobs["pool3"].shape == (2, 100, 1, 1)
    finally:
        net.close()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_torch_twin_has_our_parameters_and_shapes(name: str) -> None:
    torch = pytest.importorskip("torch")
    import _torch_nets

    param = SMALL[name]()
    net = Net(param, 0, seed=1)
    try:
        twin = _torch_nets.CaffeTwin(param)
        assert _torch_nets.param_count(twin) == bench_cpu.our_param_count(net)
        ours = {k: tuple(b.shape) for k, b in net.blobs.items()}
        for blob, shape in twin.output_shapes.items():
            if shape:  # the loss is () in the twin, (1,)-like in ours
                assert ours[blob] == shape, blob
        if name in RUN_TWIN:
            data = torch.zeros(twin.input_shapes["data"])
            label = torch.zeros(twin.input_shapes["label"])
            got = twin.blobs(data, label)
            for blob, shape in twin.output_shapes.items():
                assert tuple(got[blob].shape) == shape, blob
            loss = twin(data, label)
            assert loss.shape == () and bool(torch.isfinite(loss))
    finally:
        net.close()


@pytest.mark.parametrize("name", ["quick", "mobilenet_v1"])
def test_torch_twin_computes_our_loss(name: str) -> None:
    """With our weights copied in, the twin's loss is ours: same layers, same loss."""
    torch = pytest.importorskip("torch")
    import _torch_nets

    param = (bench_cpu.NETS["quick"].build(3) if name == "quick"
             else zoo.mobilenet_v1(batch=4, size=32, loss=True))
    net = Net(param, 0, seed=1)
    try:
        spec = bench_cpu.NETS[name]
        inputs = bench_cpu.seed_inputs(spec, {k: tuple(net.blobs[k].shape)
                                              for k in ("data", "label")})
        inputs["data"] /= spec.data_std
        for k, v in inputs.items():
            net.blobs[k].data[...] = v
        # weights far from the fillers' near-zero start (unit-variance outputs), so a wrong
        # layer shows in the loss
        rng = np.random.default_rng(1)
        for layer in net.layers:
            for blob in layer.blobs if layer.type != "BatchNorm" else ():
                fan_in = blob.count // blob.shape[0] if len(blob.shape) > 1 else 1
                blob.data[...] = rng.standard_normal(blob.shape) / np.sqrt(fan_in)
        ours = net.forward_loss()
        assert abs(ours - np.log(spec.classes)) > 0.05
        twin = _torch_nets.CaffeTwin(param)
        _torch_nets.copy_caffe_params(twin, net.params)
        theirs = twin(torch.from_numpy(inputs["data"]), torch.from_numpy(inputs["label"]))
        assert float(theirs.detach()) == pytest.approx(ours, rel=1e-4)
    finally:
        net.close()


def _bench(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_cpu.py"), "--nets", "quick@2",
           "--warmup", "0", "--rounds", "1", "--budget", "0", "--gemm-repeats", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bench_runs_without_torch(tmp_path: Path) -> None:
    # a `torch` that fails to import stands in for a machine without PyTorch
    (tmp_path / "torch.py").write_text('raise ImportError("no torch here")\n')
    out = _bench(tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert "PyTorch not installed: baseline skipped" in out
    assert "ours / floor" in out
    assert "torch NCHW" not in out
    assert "Convolution" in out


def test_workers_and_report_with_torch(capsys: pytest.CaptureFixture[str]) -> None:
    # in this process: a subprocess per worker would import PyTorch again (seconds each)
    pytest.importorskip("torch")
    args = argparse.Namespace(warmup=0.0, rounds=1, budget=0.0, gemm_repeats=1, threads=1)
    spec = bench_cpu.NETS["quick"]
    ours = bench_cpu.worker_ours(spec, 2, args)
    nchw = bench_cpu.worker_torch(spec, 2, args, channels_last=False)
    cl = bench_cpu.worker_torch(spec, 2, args, channels_last=True)
    assert nchw["params"] == cl["params"] == ours["params"]
    bench_cpu.report("quick", 2, ours, nchw, cl)
    out = capsys.readouterr().out
    assert "torch NCHW" in out and "torch ch_last" in out and "ours / torch" in out
    assert "parameters differ" not in out


def test_bench_update_prints_both_updates_and_their_ratio() -> None:
    script = ROOT / "bench" / "bench_update.py"
    proc = subprocess.run([sys.executable, str(script), "--rounds", "1"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "one pass (SGDRule)" in out and "NumPy passes (UpdateRule)" in out, out
    assert "one pass / NumPy passes = " in out and "25.6 M float32" in out, out


def test_bench_winograd_prints_both_algorithms_and_their_ratio() -> None:
    script = ROOT / "bench" / "bench_winograd.py"
    proc = subprocess.run([sys.executable, str(script), "--small", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("small")]
    assert len(lines) == 2, proc.stdout
    assert all("x  " in ln and "F(4x4" in ln for ln in lines), proc.stdout


def test_bench_backward_pairs_prints_both_ways_and_their_ratio() -> None:
    script = ROOT / "bench" / "bench_backward_pairs.py"
    proc = subprocess.run([sys.executable, str(script), "--small", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "together / apart = " in ln]
    assert len(lines) == 2, proc.stdout
    assert "53 pairs" in lines[0] and "27 pairs" in lines[1], proc.stdout
