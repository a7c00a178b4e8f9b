"""PyTorch twins of our benchmark nets: the same layers, shapes and loss, built from the
NetParameter itself, so the baseline trains exactly the net we time.

PyTorch is an optional baseline of the benchmarks, never a dependency of pycaffe-mpi: import
this module only after ``import torch`` has succeeded.

The twin runs the TRAIN-phase layers in prototxt order over a dict of named tensors (Caffe's
blobs). Supported types, which cover the benchmark nets: Input and DummyData (become the
``data``/``label`` arguments), Convolution, Pooling (MAX/AVE, Caffe's ceil rule, global),
ReLU, BatchNorm (+ a Scale on the same blob: one ``BatchNorm2d`` with its affine parameters, as
a PyTorch user writes it), Scale, Dropout, InnerProduct, Eltwise, Flatten, Concat and
SoftmaxWithLoss (mean cross-entropy over the batch, Caffe's VALID normalisation without an
ignore label). Learnable parameter counts equal ours: Caffe's BatchNorm statistics are not
learnable on either side, Scale's gamma/beta are BatchNorm2d's weight/bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pycaffe_mpi.proto import caffe_pb2

SOURCES = ("Input", "DummyData")


def _one(values: Sequence[int], default: int) -> int:
    return int(values[0]) if len(values) else default


def _pool_out(size: int, k: int, s: int, p: int) -> int:
    """Caffe's pooled size: ceil, then drop a last window that starts in the padding."""
    out = math.ceil((size + 2 * p - k) / s) + 1
    if p and (out - 1) * s >= size + p:
        out -= 1
    return out


class _Scale(nn.Module):
    """Caffe's Scale over axis 1 with a learned per-channel factor (and bias)."""

    def __init__(self, channels: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.weight.view(shape)
        return y + self.bias.view(shape) if self.bias is not None else y


def _train_layers(param: Any) -> list[Any]:
    def in_train(lp: Any) -> bool:
        return not any(r.HasField("phase") and r.phase == caffe_pb2.TEST for r in lp.include)
    return [lp for lp in param.layer if in_train(lp)]


class CaffeTwin(nn.Module):
    """A PyTorch module computing the TRAIN loss of a NetParameter; ``forward(data, label)``."""

    def __init__(self, param: Any) -> None:
        super().__init__()
        self.mods = nn.ModuleDict()
        self.plan: list[tuple[str, str, list[str], list[str], Any]] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        # module key -> the Caffe layers whose learnable blobs it holds (BatchNorm2d: the Scale)
        self.caffe_layers: dict[str, list[str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        layers = _train_layers(param)
        for i, lp in enumerate(layers):
            bottoms, tops = list(lp.bottom), list(lp.top)
            key = f"l{i}_" + lp.name.replace("/", "_").replace(".", "_")
            if lp.type in SOURCES:
                specs = (lp.input_param.shape if lp.type == "Input"
                         else lp.dummy_data_param.shape)
                for j, top in enumerate(tops):
                    dims = tuple(int(d) for d in specs[min(j, len(specs) - 1)].dim)
                    shapes[top] = self.input_shapes[top] = dims
                continue
            if lp.type == "Scale" and self.plan and self.plan[-1][0] == "BatchNormAffine" \
                    and self.plan[-1][3] == bottoms:
                self.caffe_layers[self.plan[-1][1]] = [lp.name]
                continue  # folded into the BatchNorm2d before it
            kind, extra, out = self._layer(lp, key, [shapes[b] for b in bottoms], layers, i)
            self.plan.append((kind, key, bottoms, tops, extra))
            if key in self.mods:
                self.caffe_layers[key] = [lp.name]
            for top, shape in zip(tops, out):
                shapes[top] = self.output_shapes[top] = shape

    def _layer(self, lp: Any, key: str, bshapes: list[tuple[int, ...]], layers: list[Any],
               i: int) -> tuple[str, Any, list[tuple[int, ...]]]:
        """(kind, extra, top shapes) of one layer; registers its module under ``key``."""
        t, s0 = lp.type, bshapes[0] if bshapes else ()
        if t == "Convolution":
            cp = lp.convolution_param
            kh = cp.kernel_h or _one(cp.kernel_size, 1)
            kw = cp.kernel_w or _one(cp.kernel_size[-1:], kh)
            ph = cp.pad_h or _one(cp.pad, 0)
            pw = cp.pad_w or _one(cp.pad[-1:], ph)
            sh = cp.stride_h or _one(cp.stride, 1)
            sw = cp.stride_w or _one(cp.stride[-1:], sh)
            d = _one(cp.dilation, 1)
            self.mods[key] = nn.Conv2d(s0[1], cp.num_output, (kh, kw), (sh, sw), (ph, pw), d,
                                       groups=cp.group or 1, bias=cp.bias_term)
            oh = (s0[2] + 2 * ph - d * (kh - 1) - 1) // sh + 1
            ow = (s0[3] + 2 * pw - d * (kw - 1) - 1) // sw + 1
            return "Module", None, [(s0[0], cp.num_output, oh, ow)]
        if t == "Pooling":
            pp = lp.pooling_param
            mx = pp.pool == caffe_pb2.PoolingParameter.MAX
            if pp.global_pooling:
                self.mods[key] = nn.AdaptiveMaxPool2d(1) if mx else nn.AdaptiveAvgPool2d(1)
                return "Module", None, [(s0[0], s0[1], 1, 1)]
            k = pp.kernel_h or pp.kernel_size
            st = pp.stride_h or pp.stride or 1
            p = pp.pad_h or pp.pad
            self.mods[key] = (nn.MaxPool2d(k, st, p, ceil_mode=True) if mx else
                              nn.AvgPool2d(k, st, p, ceil_mode=True, count_include_pad=True))
            return "Module", None, [(s0[0], s0[1], _pool_out(s0[2], k, st, p),
                                     _pool_out(s0[3], k, st, p))]
        if t == "ReLU":
            inplace = list(lp.top) == list(lp.bottom)
            slope = lp.relu_param.negative_slope
            self.mods[key] = (nn.LeakyReLU(slope, inplace=inplace) if slope
                              else nn.ReLU(inplace=inplace))
            return "Module", None, [s0]
        if t == "BatchNorm":
            bp = lp.batch_norm_param
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            affine = (nxt is not None and nxt.type == "Scale"
                      and list(nxt.bottom) == list(lp.top))
            self.mods[key] = nn.BatchNorm2d(s0[1], eps=bp.eps,
                                            momentum=1.0 - bp.moving_average_fraction,
                                            affine=affine)
            if affine:
                return "BatchNormAffine", None, [s0]
            return "Module", None, [s0]
        if t == "Scale":
            self.mods[key] = _Scale(s0[1], lp.scale_param.bias_term)
            return "Module", None, [s0]
        if t == "Dropout":
            self.mods[key] = nn.Dropout(lp.dropout_param.dropout_ratio)
            return "Module", None, [s0]
        if t == "InnerProduct":
            ip = lp.inner_product_param
            fan_in = math.prod(s0[1:])
            self.mods[key] = nn.Linear(fan_in, ip.num_output, bias=ip.bias_term)
            return "Linear", None, [(s0[0], ip.num_output)]
        if t == "Eltwise":
            op = lp.eltwise_param.operation
            coeff = list(lp.eltwise_param.coeff)
            return "Eltwise", (op, coeff), [s0]
        if t == "Flatten":
            return "Flatten", None, [(s0[0], math.prod(s0[1:]))]
        if t == "Concat":
            axis = lp.concat_param.axis
            out = list(s0)
            out[axis] = sum(s[axis] for s in bshapes)
            return "Concat", axis, [tuple(out)]
        if t == "SoftmaxWithLoss":
            return "SoftmaxWithLoss", None, [()]
        raise NotImplementedError(f"no PyTorch twin for layer type {t} ({lp.name})")

    def forward(self, data: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        loss = self.blobs(data, label).get("__loss__")
        if loss is None:
            raise ValueError("the net has no SoftmaxWithLoss")
        return loss

    def blobs(self, data: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every blob of one forward pass by its Caffe name; the loss also as ``__loss__``."""
        env: dict[str, torch.Tensor] = {"data": data, "label": label}
        for kind, key, bottoms, tops, extra in self.plan:
            xs = [env[b] for b in bottoms]
            if kind in ("Module", "BatchNormAffine"):
                y = self.mods[key](xs[0])
            elif kind == "Linear":
                y = self.mods[key](torch.flatten(xs[0], 1))
            elif kind == "Flatten":
                y = torch.flatten(xs[0], 1)
            elif kind == "Concat":
                y = torch.cat(xs, dim=extra)
            elif kind == "Eltwise":
                y = _eltwise(xs, *extra)
            else:  # SoftmaxWithLoss over axis 1, one label per spatial position
                scores, lab = xs
                target = lab.long().reshape(scores.shape[0], *scores.shape[2:])
                y = env["__loss__"] = F.cross_entropy(scores, target)
            env[tops[0]] = y
        return env


def _eltwise(xs: list[torch.Tensor], op: int, coeff: list[float]) -> torch.Tensor:
    if op == caffe_pb2.EltwiseParameter.PROD:
        y = xs[0]
        for x in xs[1:]:
            y = y * x
        return y
    if op == caffe_pb2.EltwiseParameter.MAX:
        y = xs[0]
        for x in xs[1:]:
            y = torch.maximum(y, x)
        return y
    if coeff:
        return sum(c * x for c, x in zip(coeff, xs))  # type: ignore[return-value]
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    return y


@torch.no_grad()
def copy_caffe_params(model: CaffeTwin, params: dict[str, list[Any]]) -> None:
    """Load our net's learnable blobs (``Net.params``: layer name -> blobs with ``.data``)
    into the twin; Caffe's blob layouts are PyTorch's (conv (Cout, Cin/g, kh, kw), inner
    product (out, in); a Scale's gamma/beta are BatchNorm2d's weight/bias). BatchNorm
    statistics are not copied: both sides train on batch statistics."""
    for key, names in model.caffe_layers.items():
        mod = model.mods[key]
        blobs = params.get(names[0], [])
        if (isinstance(mod, nn.BatchNorm2d) and not mod.affine) or not blobs:
            continue
        mod.weight.copy_(torch.from_numpy(blobs[0].data.reshape(mod.weight.shape)))
        if len(blobs) > 1 and mod.bias is not None:
            mod.bias.copy_(torch.from_numpy(blobs[1].data.reshape(mod.bias.shape)))


def param_count(model: nn.Module) -> int:
    """Learnable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())
