"""CPU train step of four nets against their GEMM floor and PyTorch, measured in one run.

For CIFAR10-Quick (batch 100 and 350), NiN at CIFAR-100 sizes (batch 128), ResNet-50 (batch 8,
224x224) and MobileNet v1 (batch 16, 224x224) it prints:

- our train step (forward + backward + SGD update with momentum and weight decay, float32);
- the GEMM floor: the same net's matrix products alone, as whole-batch NumPy matmuls (one
  stacked matmul or einsum over the groups of a grouped or depthwise convolution), im2col's
  products also for the convolutions that run Winograd (fewer multiplications: a step can
  come out under its floor); those layers are named;
- PyTorch's train step of the same net (same shapes, same loss, same SGD; NCHW and
  channels_last; ``torch.set_num_threads`` equal to our BLAS threads), when PyTorch is
  installed: it is an optional baseline, never a dependency;
- the ratios ours / floor, ours / PyTorch NCHW, ours / PyTorch channels_last;
- each layer type's share of our step, and the slowest layers against their GEMMs (each layer
  timed alone: an in-place BatchNorm + Scale pair, whose backward a step runs in one, is timed
  as two; the pairs are counted);
- peak RSS (VmHWM) of ours and of PyTorch's, each net in its own process, and the part of it
  above the process's RSS once its libraries are imported.

Every (net, batch, framework) runs in a fresh subprocess, one after another: a step timed in
a process that ran another net measured up to 1.7x slower here (allocator and page-fault
effects), and peak RSS is only meaningful per process. Each one trains for a warm-up period,
then keeps the best step over several rounds spread in time (this VM has slow phases lasting
seconds). Inputs are fixed tensors filled once on both sides, so no step pays for data
generation. Compare ratios, not milliseconds, across machines.

Run it with OpenBLAS's machine overrides unset (they force half-speed kernels here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_cpu.py \
        [--quick] [--nets quick,nin,resnet50,mobilenet_v1] [--no-torch]

``--nets`` takes names with optional batches, e.g. ``--nets quick@100,resnet50@4``.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

import _nets  # noqa: E402
import bench_cifar10_quick as quick  # noqa: E402

from pycaffe_mpi import solvers  # noqa: E402
from pycaffe_mpi.kernels import threads  # noqa: E402
from pycaffe_mpi.proto import caffe_pb2  # noqa: E402
from pycaffe_mpi.testing import zoo  # noqa: E402

QUICK = os.path.join(ROOT, "models", "cifar10_quick", "train_test.prototxt")
NIN = os.path.join(ROOT, "models", "cifar10_nin", "train_test.prototxt")


class Spec:
    """A benchmark net: its builder, default batches, classes and input scale."""

    def __init__(self, build: Callable[[int], Any], batches: tuple[int, ...], classes: int,
                 data_std: float, title: str) -> None:
        self.build, self.batches, self.classes = build, batches, classes
        self.data_std, self.title = data_std, title


# NOTE: CIFAR inputs get DummyData's N(0, 50) (mean-subtracted pixels); ImageNet nets N(0, 1).
NETS = {
    "quick": Spec(lambda b: _nets.with_input_data(QUICK, b), (100, 350), 10, 50.0,
                  "CIFAR10-Quick"),
    "nin": Spec(lambda b: _nets.with_input_data(NIN, b), (128,), 100, 50.0,
                "NiN, CIFAR-100 sizes"),
    "resnet50": Spec(lambda b: zoo.resnet50(batch=b, size=224, loss=True), (8,), 1000, 1.0,
                     "ResNet-50, 224x224"),
    "mobilenet_v1": Spec(lambda b: zoo.mobilenet_v1(batch=b, size=224, loss=True), (16,),
                         1000, 1.0, "MobileNet v1, 224x224"),
}
SOLVER = {"base_lr": 0.001, "momentum": 0.9, "weight_decay": 0.004}


# -- the machine ---

def blas_threads() -> int:
    """Threads of the OpenBLAS NumPy loaded (asked from the library), else the cores we have."""
    try:
        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln}
        for path in libs:
            lib = ctypes.CDLL(path)
            for sym in ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
                        "openblas_get_num_threads64_"):
                if hasattr(lib, sym):
                    return int(getattr(lib, sym)())
    except OSError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- timing, the same protocol on both sides ---

def timed_rounds(step: Callable[[], Any], args: argparse.Namespace,
                 between: Callable[[], None] | None = None,
                 between_steps: int = 1) -> tuple[float, int]:
    """Best step time (s) after ``args.warmup`` seconds of training, over up to ``args.rounds``
    rounds of best-of repeats sized to ``args.budget`` seconds; ``between`` (costing about
    ``between_steps`` steps) runs after each round: ours, the per-layer pass. Returns (best,
    steps timed)."""
    t0 = time.perf_counter()
    step()
    while time.perf_counter() - t0 < args.warmup:
        step()
    t = time.perf_counter()
    step()
    est = time.perf_counter() - t
    per_round = est * (1 + (between_steps if between else 0))
    repeats = max(1, min(10, int(args.budget / (args.rounds * per_round))))
    best, n, t0 = est, 1, time.perf_counter()
    for r in range(args.rounds):
        if r and time.perf_counter() - t0 > args.budget:
            break
        best = min(best, quick.best_of(step, repeats))
        n += repeats
        if between:
            between()
    return best, n


def seed_inputs(spec: Spec, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"data": (rng.standard_normal(shapes["data"]) * spec.data_std).astype(np.float32),
            "label": rng.integers(0, spec.classes, shapes["label"]).astype(np.float32)}


def our_param_count(net: Any) -> int:
    """Learnable parameters, as PyTorch counts them (BatchNorm statistics excluded)."""
    return sum(b.count for layer in net.layers if layer.type != "BatchNorm"
               for b in layer.blobs)


def worker_ours(spec: Spec, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    base = rss_mib("VmRSS")
    sp = caffe_pb2.SolverParameter(lr_policy="fixed", max_iter=10**9, display=0,
                                   random_seed=1, solver_mode=0, **SOLVER)
    sp.net_param.CopyFrom(spec.build(batch))
    solver = solvers.Solver(sp)
    net = solver.net
    inputs = seed_inputs(spec, {k: tuple(net.blobs[k].shape) for k in ("data", "label")})
    for k, v in inputs.items():
        net.blobs[k].data[...] = v
    per: list[float] | None = None
    layer_repeats = 1 if args.budget < 10 else 2

    def layer_pass() -> None:
        nonlocal per
        times = quick.layer_times(net, layer_repeats)
        per = times if per is None else [min(a, b) for a, b in zip(per, times)]

    step, n = timed_rounds(lambda: solver.step(1), args, layer_pass, layer_repeats)
    peak = rss_mib("VmHWM")
    # the floor is whole-batch GEMMs on BLAS's own threads (our step held BLAS at one thread
    # while its layers split their work between the cores)
    threads.set_count(1)
    shapes = quick.gemm_shapes(net)
    floor = quick.time_gemms(shapes, args.gemm_repeats)
    out = {"step": step, "steps": n, "peak": peak, "base": base, "floor": floor,
           "flops": quick.gemm_flops(shapes), "params": our_param_count(net),
           "layers": [(name, layer.type, t) for name, layer, t
                      in zip(net.layer_names, net.layers, per or [])],
           "winograd": [name for name, layer in zip(net.layer_names, net.layers)
                        if getattr(getattr(layer, "plan", None), "winograd", 0)],
           "bn_scale_pairs": len(net.backward_pairs),
           "threads": blas_threads()}
    net.close()
    return out


def worker_torch(spec: Spec, batch: int, args: argparse.Namespace,
                 channels_last: bool) -> dict[str, Any]:
    # NOTE: imported here, in the baseline's own process, so ours never loads PyTorch
    import _torch_nets
    import torch

    torch.set_num_threads(args.threads)
    base = rss_mib("VmRSS")
    torch.manual_seed(1)
    model = _torch_nets.CaffeTwin(spec.build(batch))
    inputs = seed_inputs(spec, model.input_shapes)
    data = torch.from_numpy(inputs["data"])
    label = torch.from_numpy(inputs["label"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = data.contiguous(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=SOLVER["base_lr"],
                          momentum=SOLVER["momentum"], weight_decay=SOLVER["weight_decay"])

    def step() -> None:
        opt.zero_grad()  # PyTorch's default: gradients set to None, no memset
        model(data, label).backward()
        opt.step()

    best, n = timed_rounds(step, args)
    return {"step": best, "steps": n, "peak": rss_mib("VmHWM"), "base": base,
            "params": _torch_nets.param_count(model), "threads": torch.get_num_threads()}


# -- the driver ---

def run_worker(kind: str, name: str, batch: int, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--nets",
           f"{name}@{batch}", "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--rounds", str(args.rounds), "--budget", str(args.budget),
           "--gemm-repeats", str(args.gemm_repeats)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {kind} worker for {name}@{batch} failed (exit {proc.returncode})")
    return None


def torch_available() -> str | None:
    """PyTorch's version when it imports, else None (checked in a child: importing it here
    would load its thread pools into the driver)."""
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def parse_nets(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, batches = item.strip().partition("@")
        if name not in NETS:
            raise SystemExit(f"unknown net {name!r}; known: {', '.join(NETS)}")
        bs = [int(b) for b in batches.split("+")] if batches else NETS[name].batches
        out += [(name, b) for b in bs]
    return out


def header(args: argparse.Namespace, torch_version: str | None) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    baseline = (f"PyTorch {torch_version}, {args.threads} threads" if torch_version else
                "PyTorch baseline skipped (--no-torch)" if args.no_torch else
                "PyTorch not installed: baseline skipped")
    print(f"machine: {cpu_model()}, {cores} cores; NumPy {np.__version__}, BLAS threads "
          f"{blas_threads()}; {baseline}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"warning: {var}={os.environ[var]} is set; OpenBLAS may run at reduced speed "
                  "(run with env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)")
    mode = "quick" if args.quick else "full"
    print(f"protocol ({mode}): fresh process per net and framework, {args.warmup:g} s warm-up, "
          f"best step of up to {args.rounds} rounds in ~{args.budget:g} s; float32")


def report(name: str, batch: int, ours: dict | None, nchw: dict | None,
           cl: dict | None) -> None:
    spec = NETS[name]
    print(f"\n{spec.title}, batch {batch}")
    if ours is None:
        for label, res in (("torch NCHW", nchw), ("torch ch_last", cl)):
            if res is not None:
                print(f"  {label:<13} {res['step'] * 1e3:9.1f} ms  peak RSS "
                      f"{res['peak']:7.0f} MiB (ours failed: no ratios)")
        return
    floor = sum(ours["floor"].values())
    step = ours["step"]
    print(f"  ours          {step * 1e3:9.1f} ms  peak RSS {ours['peak']:7.0f} MiB "
          f"(+{ours['peak'] - ours['base']:.0f} over imports)  [{ours['steps']} steps timed]")
    print(f"  GEMM floor    {floor * 1e3:9.1f} ms  ({ours['flops'] / 1e9:.1f} GFLOP, "
          f"{ours['flops'] / floor / 1e9:.0f} GFLOP/s)   ours / floor = {step / floor:.2f}x")
    for label, res in (("torch NCHW", nchw), ("torch ch_last", cl)):
        if res is None:
            continue
        extra = "" if res["params"] == ours["params"] else \
            f"  (parameters differ: {res['params']} vs ours {ours['params']})"
        if res["threads"] != ours["threads"]:
            extra += f"  ({res['threads']} threads, ours {ours['threads']})"
        print(f"  {label:<13} {res['step'] * 1e3:9.1f} ms  peak RSS {res['peak']:7.0f} MiB "
              f"(+{res['peak'] - res['base']:.0f} over imports)   ours / torch = "
              f"{step / res['step']:.2f}x, RSS ours / torch = "
              f"{ours['peak'] / res['peak']:.2f}x{extra}")
    layers = ours["layers"]
    total = sum(t for _, _, t in layers)
    by_type: dict[str, float] = collections.defaultdict(float)
    for _, typ, t in layers:
        by_type[typ] += t
    # NOTE: shares are of the layers' summed best times, not of the step: on a noisy machine
    # the per-layer pass can come out slower than the best whole step.
    rest = (f"update and overhead {(step - total) * 1e3:.1f} ms" if total <= step else
            "more than the best step: a noisy machine")
    print(f"  share of our step by layer type (forward+backward of the layers: "
          f"{total * 1e3:.1f} ms, {rest}):")
    for typ, t in sorted(by_type.items(), key=lambda kv: -kv[1]):
        g = sum(ours["floor"].get(n, 0.0) for n, ty, _ in layers if ty == typ)
        gtxt = f"  (GEMMs {g * 1e3:7.1f} ms, {t / g:4.2f}x)" if g else ""
        print(f"    {typ:<16} {100 * t / total:5.1f}%  {t * 1e3:8.1f} ms{gtxt}")
    slowest = sorted(layers, key=lambda x: -x[2])[: 13 if len(layers) <= 16 else 8]
    print("  slowest layers:")
    for lname, typ, t in slowest:
        g = ours["floor"].get(lname)
        gtxt = f"  (GEMMs {g * 1e3:7.1f} ms, {t / g:4.2f}x)" if g else ""
        if lname in ours["winograd"]:
            gtxt += "  Winograd"
        print(f"    {lname:<24} {typ:<16} {100 * t / total:5.1f}%  {t * 1e3:8.1f} ms{gtxt}")
    if ours["winograd"]:
        print(f"  Winograd convolutions ({len(ours['winograd'])}; their GEMMs above are im2col's): "
              + ", ".join(ours["winograd"]))
    if ours.get("bn_scale_pairs"):
        print(f"  in-place BatchNorm + Scale pairs: {ours['bn_scale_pairs']} (a step runs each "
              "pair's backward in one; the shares above time them apart)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS),
                    help="names, each with optional batches: quick@100+350,resnet50@4")
    ap.add_argument("--quick", action="store_true", help="short warm-up, fewer rounds")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--warmup", type=float, help="seconds of training before timing")
    ap.add_argument("--rounds", type=int, help="timing rounds spread over time")
    ap.add_argument("--budget", type=float, help="seconds of timed steps per net and framework")
    ap.add_argument("--gemm-repeats", type=int, help="repeats of each GEMM (best is kept)")
    ap.add_argument("--threads", type=int, help="PyTorch threads (default: our BLAS threads)")
    ap.add_argument("--worker", choices=("ours", "torch", "torch_cl"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for field, full, short in (("warmup", 10.0, 2.0), ("rounds", 4, 2), ("budget", 30.0, 6.0),
                               ("gemm_repeats", 5, 2)):
        if getattr(args, field) is None:
            setattr(args, field, short if args.quick else full)
    if args.threads is None:
        args.threads = blas_threads()
    runs = parse_nets(args.nets)
    if args.worker:
        (name, batch), = runs
        spec = NETS[name]
        res = (worker_ours(spec, batch, args) if args.worker == "ours" else
               worker_torch(spec, batch, args, channels_last=args.worker == "torch_cl"))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    torch_version = None if args.no_torch else torch_available()
    header(args, torch_version)
    t0 = time.perf_counter()
    results = []
    for name, batch in runs:
        ours = run_worker("ours", name, batch, args)
        nchw = cl = None
        if torch_version:
            nchw = run_worker("torch", name, batch, args)
            cl = run_worker("torch_cl", name, batch, args)
        report(name, batch, ours, nchw, cl)
        results.append((name, batch, ours, nchw, cl))
        sys.stdout.flush()
    summary(results)
    print(f"\n(whole run {math.ceil(time.perf_counter() - t0)} s)")
    return 0


def summary(results: list[tuple[str, int, dict | None, dict | None, dict | None]]) -> None:
    """One line per net: the ratios the speed work is judged by (lower is better for us)."""
    print("\nsummary: ours / GEMM floor, ours / PyTorch NCHW, ours / PyTorch channels_last "
          "(step time); peak RSS ours / PyTorch NCHW")
    print(f"  {'net':<28} {'step ms':>9} {'/floor':>7} {'/NCHW':>7} {'/ch_last':>8} "
          f"{'RSS MiB':>8} {'/NCHW':>7}")

    def ratio(a: float, res: dict | None, key: str) -> str:
        return f"{a / res[key]:.2f}x" if res else "-"

    for name, batch, ours, nchw, cl in results:
        title = f"{NETS[name].title}, b{batch}"
        if ours is None:
            print(f"  {title:<28} failed")
            continue
        floor = sum(ours["floor"].values())
        step = ours["step"]
        print(f"  {title:<28} {step * 1e3:9.1f} {step / floor:6.2f}x "
              f"{ratio(step, nchw, 'step'):>7} {ratio(step, cl, 'step'):>8} "
              f"{ours['peak']:8.0f} {ratio(ours['peak'], nchw, 'peak'):>7}")


if __name__ == "__main__":
    sys.exit(main())
