"""GPU train-step benchmark against PyTorch on the same device, in one run.

Nets: CIFAR10-Quick at batch 100 and 350 (models/cifar10_quick), NiN for CIFAR-10 at batch 128
(Lin et al. 2014, written below), ResNet-50 at batch 32 (224x224, pycaffe_mpi.testing.zoo). For
each: the mean time of one SGD train step (forward, backward, momentum update; the input fixed
on the device, so no data loading is timed), images/s, each layer type's share of the step, and
the peak device memory (CuPy's pool high-water mark); then PyTorch's step for the same net
(cuDNN autotuned, float32 without TF32, NCHW) and the ratio of throughputs. Results go to
stdout and, with ``--out``, to a text file.

``--dry-run`` builds every net and runs one step of each on the CPU at a small batch (and the
PyTorch nets on the CPU where torch is installed): it checks the script, not the speed.

Usage::

    python bench/bench_gpu.py [--out results.txt] [--steps 20] [--nets quick100,resnet50_32]
    python bench/bench_gpu.py --dry-run
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf import text_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pycaffe_mpi import backend as backend_mod  # noqa: E402
from pycaffe_mpi import prototxt, solvers  # noqa: E402
from pycaffe_mpi.proto import caffe_pb2  # noqa: E402
from pycaffe_mpi.testing import zoo  # noqa: E402

QUICK = os.path.join(ROOT, "models", "cifar10_quick", "train_test.prototxt")


# -- the nets, ours -------------------------------------------------------------------------------

def _input_layers(batch: int, chw: tuple[int, int, int]) -> str:
    c, h, w = chw
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: {batch} dim: {c} dim: {h} dim: {w} }} }} }}\n'
            f'layer {{ name: "label" type: "Input" top: "label" '
            f'input_param {{ shape {{ dim: {batch} }} }} }}\n')


def quick(batch: int) -> caffe_pb2.NetParameter:
    """CIFAR10-Quick's TRAIN net with its data layers replaced by fixed inputs."""
    param, _ = prototxt.read_net(QUICK)
    layers = [lp for lp in param.layer if lp.type not in ("Data", "Accuracy")]
    out = text_format.Merge(_input_layers(batch, (3, 32, 32)), caffe_pb2.NetParameter())
    out.name = "cifar10_quick"
    out.layer.extend(layers)
    return out


def _nin_conv(name: str, bottom: str, n: int, k: int, pad: int = 0, stride: int = 1) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} stride: {stride} '
            f'weight_filler {{ type: "gaussian" std: 0.05 }} bias_filler {{ type: "constant" }} '
            f'}} }}\nlayer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def _pool(name: str, bottom: str, kind: str, k: int = 3, s: int = 2, glob: bool = False) -> str:
    geo = "global_pooling: true" if glob else f"kernel_size: {k} stride: {s}"
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            f'pooling_param {{ pool: {kind} {geo} }} }}\n')


def nin(batch: int) -> caffe_pb2.NetParameter:
    """Network in Network for CIFAR-10 (the authors' cifar10 model: three mlpconv blocks of a
    spatial conv and two 1x1 convs, dropout between blocks, global average pooling of 10 maps)."""
    t = _input_layers(batch, (3, 32, 32))
    t += _nin_conv("conv1", "data", 192, 5, 2) + _nin_conv("cccp1", "conv1", 160, 1)
    t += _nin_conv("cccp2", "cccp1", 96, 1) + _pool("pool1", "cccp2", "MAX")
    t += 'layer { name: "drop1" type: "Dropout" bottom: "pool1" top: "pool1" }\n'
    t += _nin_conv("conv2", "pool1", 192, 5, 2) + _nin_conv("cccp3", "conv2", 192, 1)
    t += _nin_conv("cccp4", "cccp3", 192, 1) + _pool("pool2", "cccp4", "AVE")
    t += 'layer { name: "drop2" type: "Dropout" bottom: "pool2" top: "pool2" }\n'
    t += _nin_conv("conv3", "pool2", 192, 3, 1) + _nin_conv("cccp5", "conv3", 192, 1)
    t += _nin_conv("cccp6", "cccp5", 10, 1) + _pool("pool3", "cccp6", "AVE", glob=True)
    t += ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool3" bottom: "label" '
          'top: "loss" }\n')
    param = text_format.Merge(t, caffe_pb2.NetParameter())
    param.name = "nin_cifar10"
    return param


def resnet50(batch: int, size: int = 224) -> caffe_pb2.NetParameter:
    return zoo.resnet50(batch=batch, size=size, loss=True)


# (name, our net, torch net, batch, classes, input chw)
NETS: dict[str, tuple[Callable[[int], Any], str, int, int, tuple[int, int, int]]] = {
    "quick100": (quick, "quick", 100, 10, (3, 32, 32)),
    "quick350": (quick, "quick", 350, 10, (3, 32, 32)),
    "nin128": (nin, "nin", 128, 10, (3, 32, 32)),
    "resnet50_32": (resnet50, "resnet50", 32, 1000, (3, 224, 224)),
}


# -- timing ours -----------------------------------------------------------------------------------

def _solver(param: caffe_pb2.NetParameter, backend: Any) -> solvers.Solver:
    sp = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=0.004,
                                   lr_policy="fixed", max_iter=10**6, display=0, random_seed=1)
    sp.net_param.CopyFrom(param)
    return solvers.Solver(sp, backend=backend)


def ours(name: str, backend: Any, steps: int, batch: int | None = None,
         size: int | None = None) -> dict[str, Any]:
    make, _, default_batch, classes, _ = NETS[name]
    batch = batch or default_batch
    param = make(batch) if size is None else make(batch, size)
    s = _solver(param, backend)
    net, rng = s.net, np.random.default_rng(0)
    net.blobs["data"].data[...] = backend.asarray(
        rng.standard_normal(net.blobs["data"].shape).astype(np.float32))
    net.blobs["label"].data[...] = backend.asarray(
        rng.integers(0, classes, net.blobs["label"].shape).astype(np.float32))
    s.step(min(3, steps))  # warm-up: kernel compiles, cuDNN/cuBLAS plans, pool growth
    backend.synchronize()
    t = time.perf_counter()
    s.step(steps)
    backend.synchronize()
    step = (time.perf_counter() - t) / steps
    shares = _layer_shares(net, backend)
    mem = backend_mod.memory_in_use(backend.device_id) if backend.is_gpu else {"held": 0}
    return {"step_ms": step * 1e3, "images_s": batch / step, "shares": shares,
            "peak_mb": mem["held"] / 2**20, "loss": float(s.smoothed_loss), "batch": batch}


def _layer_shares(net: Any, backend: Any) -> list[tuple[str, float]]:
    """Each layer type's share of one forward+backward, layers timed one by one (with a device
    synchronisation after each, so the shares add up; the sum exceeds the pipelined step)."""
    n = len(net.layers)
    spent: dict[str, float] = collections.defaultdict(float)
    for i in range(n):
        backend.synchronize()
        t = time.perf_counter()
        net.forward_from_to(i, i)
        backend.synchronize()
        spent[net.layers[i].type] += time.perf_counter() - t
    for i in range(n - 1, -1, -1):
        t = time.perf_counter()
        net.backward_from_to(i, i)
        backend.synchronize()
        spent[net.layers[i].type] += time.perf_counter() - t
    total = sum(spent.values()) or 1.0
    return sorted(((k, v / total) for k, v in spent.items()), key=lambda kv: -kv[1])


# -- timing PyTorch --------------------------------------------------------------------------------

def torch_net(kind: str, classes: int) -> Any:
    from torch import nn

    if kind == "quick":
        return nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(),
            nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.Linear(64, classes))
    if kind == "nin":
        def block(cin: int, c: int, c1: int, c2: int, k: int, pad: int) -> list[Any]:
            return [nn.Conv2d(cin, c, k, padding=pad), nn.ReLU(), nn.Conv2d(c, c1, 1), nn.ReLU(),
                    nn.Conv2d(c1, c2, 1), nn.ReLU()]
        return nn.Sequential(
            *block(3, 192, 160, 96, 5, 2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(),
            *block(96, 192, 192, 192, 5, 2), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(),
            *block(192, 192, 192, classes, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if kind == "resnet50":
        import torchvision

        return torchvision.models.resnet50(num_classes=classes)
    raise ValueError(kind)


def theirs(name: str, device: str, steps: int, batch: int | None = None,
           size: int | None = None) -> dict[str, Any]:
    import torch

    _, kind, default_batch, classes, chw = NETS[name]
    batch = batch or default_batch
    if size is not None:
        chw = (chw[0], size, size)
    torch.backends.cudnn.benchmark = True
    # NOTE: exact float32 like ours: PyTorch lets cuDNN use TF32 tensor cores by default
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = torch_net(kind, classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.004)
    x = torch.randn(batch, *chw, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(min(3, steps)):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return {"step_ms": dt * 1e3, "images_s": batch / dt, "peak_mb": peak,
            "loss": loss.item(), "batch": batch}


# -- the run ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated: " + ", ".join(NETS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per net (default 20)")
    ap.add_argument("--out", help="also write the results to this file")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--dry-run", action="store_true",
                    help="one step of each net on the CPU at a small batch: checks the script")
    args = ap.parse_args(argv)
    names = [n for n in args.nets.split(",") if n]
    unknown = [n for n in names if n not in NETS]
    if unknown:
        ap.error(f"unknown nets {unknown}; known: {', '.join(NETS)}")
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    if args.dry_run:
        backend, device, steps = backend_mod.CPU, "cpu", 1
        say("DRY RUN on the CPU (small batches, one step): no speed is measured")
    else:
        if not backend_mod.gpu_available():
            print("bench_gpu: no usable CUDA device (CuPy and a GPU are needed); "
                  "use --dry-run to check the script without one", file=sys.stderr)
            return 2
        backend, device, steps = backend_mod.Backend("gpu", 0), "cuda", args.steps
        props = backend_mod.device_properties(0)
        say(f"device: {props.get('name', '?')} (CUDA device 0); {steps} timed steps per net")
    for name in names:
        small = ({"batch": 1} if name.startswith("resnet") else {"batch": 2}) \
            if args.dry_run else {}
        r = ours(name, backend, steps, **small)
        say(f"\n{name} (batch {r['batch']}): pycaffe-mpi step {r['step_ms']:.2f} ms, "
            f"{r['images_s']:.0f} images/s, peak device memory {r['peak_mb']:.0f} MiB, "
            f"loss {r['loss']:.4f}")
        say("  share of the step by layer type: " + ", ".join(
            f"{k} {v:.0%}" for k, v in r["shares"][:8]))
        if args.no_torch:
            continue
        try:
            import torch  # noqa: F401
        except ImportError:
            say("  PyTorch: not installed, no baseline")
            continue
        try:
            p = theirs(name, device, steps, **small)
        except ImportError as e:  # torchvision (ResNet-50) may be missing where torch is not
            say(f"  PyTorch: no baseline ({e})")
            continue
        say(f"  PyTorch step {p['step_ms']:.2f} ms, {p['images_s']:.0f} images/s, "
            f"peak {p['peak_mb']:.0f} MiB; throughput ratio pycaffe-mpi/PyTorch "
            f"{r['images_s'] / p['images_s']:.2f}")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
