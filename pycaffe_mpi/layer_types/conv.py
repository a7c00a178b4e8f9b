"""Convolution family: Convolution, Deconvolution, Im2col (Caffe's conv, deconv, im2col layers).

All three read their geometry from ``convolution_param`` the same way (:func:`conv_geometry`)
and run on one :class:`pycaffe_mpi.kernels.conv_plan.ConvPlan`: Deconvolution is the plan read
backwards (its forward is the convolution's input gradient and vice versa), Im2col is the plan's
unfold on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import conv_plan, scratch, threads
from pycaffe_mpi.kernels import im2col as im2col_k
from pycaffe_mpi.layer import Layer, canonical_axis
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer


class ConvGeometry:
    """``convolution_param``'s per-axis geometry for a bottom with ``nsp`` spatial axes."""

    def __init__(self, layer: Layer, p: Any, nsp: int) -> None:
        self.kernel = _spatial(layer, "kernel", list(p.kernel_size), p, nsp, None)
        self.stride = _spatial(layer, "stride", list(p.stride), p, nsp, 1)
        self.pad = _spatial(layer, "pad", list(p.pad), p, nsp, 0)
        self.dilation = _spatial(layer, "dilation", list(p.dilation), p, nsp, 1)
        layer.require(all(k > 0 for k in self.kernel), "convolution_param.kernel_size",
                      f"filter dimensions must be nonzero, got {self.kernel}")
        layer.require(all(s > 0 for s in self.stride), "convolution_param.stride",
                      f"stride dimensions must be nonzero, got {self.stride}")
        layer.require(all(d > 0 for d in self.dilation), "convolution_param.dilation",
                      f"dilation dimensions must be nonzero, got {self.dilation}")

    def extent(self) -> tuple[int, ...]:
        """The dilated kernel's size per axis, ``dil·(k − 1) + 1``."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))


def _spatial(layer: Layer, name: str, values: list[int], p: Any, nsp: int,
             default: int | None) -> tuple[int, ...]:
    """One value per spatial axis from ``name`` (repeated) or ``name_h``/``name_w``."""
    field = f"convolution_param.{name}" + ("_size" if name == "kernel" else "")
    hw = [f"{name}_h", f"{name}_w"] if name != "dilation" else []
    if any(p.HasField(f) for f in hw):
        layer.require(nsp == 2, f"convolution_param.{hw[0]}",
                      f"{hw[0]}/{hw[1]} can only be used for 2-D convolution, "
                      f"the bottom has {nsp} spatial axes")
        layer.require(not values, field,
                      f"either {name}{'_size' if name == 'kernel' else ''} or "
                      f"{hw[0]}/{hw[1]} should be specified, not both")
        if name == "pad":
            return (int(p.pad_h), int(p.pad_w))
        layer.require(all(p.HasField(f) for f in hw), f"convolution_param.{hw[0]}",
                      f"give both {hw[0]} and {hw[1]}")
        return (int(getattr(p, hw[0])), int(getattr(p, hw[1])))
    if not values:
        layer.require(default is not None, field,
                      "kernel_size (or kernel_h and kernel_w) is required")
        return (int(default),) * nsp
    layer.require(len(values) in (1, nsp), field,
                  f"give one value or one per spatial axis ({nsp}), got {len(values)}")
    return tuple(int(v) for v in values) * (nsp if len(values) == 1 else 1)


def _channel_axis(layer: Layer, p: Any, shape: Sequence[int]) -> int:
    axis = canonical_axis(layer, p.axis, len(shape), "convolution_param.axis")
    layer.require(len(shape) - axis - 1 >= 1, "convolution_param.axis",
                  f"needs at least one spatial axis after the channel axis {axis}; "
                  f"bottom shape is {tuple(shape)}")
    return axis


class _BaseConvolution(Layer):
    """What Convolution and Deconvolution share (Caffe's ``BaseConvolutionLayer``): the
    parameters, the weight and bias blobs, the bottom checks and the plan.

    ``reverse`` (Deconvolution): the plan's convolution runs from the top to the bottom, so its
    input channels are ``num_output`` and its outputs the bottom's channels.
    """

    min_bottom = 1
    min_top = 1
    reverse = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.convolution_param
        self.require(len(bottom) == len(top), "top",
                     f"{self.type} needs one top per bottom, got {len(bottom)} bottom(s) "
                     f"and {len(top)} top(s)")
        shape = bottom[0].shape
        self.axis = _channel_axis(self, p, shape)
        self.num_axes = len(shape)
        self.geom = ConvGeometry(self, p, len(shape) - self.axis - 1)
        self.channels = shape[self.axis]
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        self.bias_term = bool(p.bias_term)
        self.require(self.num_output > 0, "convolution_param.num_output",
                     "num_output must be set to a positive number")
        self.require(self.group > 0 and self.channels % self.group == 0,
                     "convolution_param.group",
                     f"the {self.channels} input channels must be a multiple of group {self.group}")
        self.require(self.num_output % self.group == 0, "convolution_param.group",
                     f"num_output {self.num_output} must be a multiple of group {self.group}")
        conv_in, conv_out = ((self.num_output, self.channels) if self.reverse
                             else (self.channels, self.num_output))
        g = self.geom
        # NOTE: engine CAFFE asks for Caffe's own algorithm (im2col + GEMM) where DEFAULT (and
        # CUDNN, whose library picks its algorithm, Winograd among them) may run Winograd
        self.plan = conv_plan.ConvPlan(self.xp, self.dtype, conv_in, conv_out, self.group,
                                      g.kernel, g.stride, g.pad, g.dilation,
                                      winograd=p.engine != caffe_pb2.ConvolutionParameter.CAFFE)
        wshape = (conv_out, conv_in // self.group, *g.kernel)
        n_blobs = 1 + self.bias_term
        self.init_param_blobs([wshape, (self.num_output,)][:n_blobs], "convolution_param",
                              ["weight_filler", "bias_filler"][:n_blobs])

    def _add_bias_diff(self, diff: Any) -> None:
        """``db += Σ_{n, positions} dy``."""
        dy = diff.reshape(self.num, self.num_output, -1)
        ones = getattr(self, "_ones", None)
        if ones is None or ones.shape[0] != dy.shape[2] or ones.dtype != dy.dtype:
            ones = self._ones = self.xp.ones(dy.shape[2], dy.dtype)
        # NOTE: a matrix-vector product sums the positions ~3x faster than sum(axis=(0, 2))
        # (CIFAR10-Quick conv1-3 at batch 100, one thread: 0.89 → 0.28 ms in all); on the host
        # the images are split between the cores, partial sums added in lane order.
        if self.backend.is_gpu:
            self.blobs[1].diff[...] += (dy @ ones).sum(axis=0)
            return
        parts = threads.run(lambda lane, lo, hi: (dy[lo:hi] @ ones).sum(axis=0), dy.shape[0])
        for part in parts:
            self.blobs[1].diff[...] += part

    def _check_bottoms(self, bottom: Sequence[Blob]) -> tuple[int, ...]:
        shape = tuple(bottom[0].shape)
        self.require(len(shape) == self.num_axes, "bottom",
                     f"bottom num_axes may not change (was {self.num_axes}, now {len(shape)})")
        self.require(shape[self.axis] == self.channels, "bottom",
                     f"input has {shape[self.axis]} channels, the weights expect {self.channels}")
        for i, b in enumerate(bottom[1:], 1):
            self.require(tuple(b.shape) == shape, "bottom",
                         f"all bottoms must have the same shape: bottom 0 is {shape}, "
                         f"bottom {i} is {tuple(b.shape)}")
        self.num = math.prod(shape[: self.axis])
        self.spatial = shape[self.axis + 1:]
        return shape


@register_layer("Convolution")
class Convolution(_BaseConvolution):
    """N-D convolution with groups, stride, padding and dilation (Caffe's ``Convolution``).

    Bottom i → top i (any number of pairs, all bottoms the same shape, shared weights).

    Shapes:
        bottom: ``(*lead, C, *S)``, ``C`` at ``axis`` (default 1), ``N = Π lead``.
        top: ``(*lead, O, *Out)``,
        ``Out_d = (S_d + 2·pad_d − (dil_d·(k_d−1) + 1)) // stride_d + 1``.
        blobs: weight ``(O, C/group, *k)``; bias ``(O,)`` when ``bias_term``.

    Params (``convolution_param``): num_output (required), bias_term (true), kernel_size (required;
    one value or one per spatial axis) or kernel_h/kernel_w (2-D), stride (1) or stride_h/stride_w,
    pad (0) or pad_h/pad_w, dilation (1), group (1), weight_filler / bias_filler (constant 0),
    axis (1), engine (DEFAULT: see below; CAFFE: im2col + GEMM always; CUDNN as DEFAULT).
    force_nd_im2col is accepted and ignored.

    Forward (per group g): ``y_g = W_g ⋆ x_g + b``: ``cols = im2col(x)``, the
    ``(N·ΠOut, Cg·Πk)`` matrix of windows, times ``W_gᵀ`` (:meth:`ConvPlan.forward`).

    Backward: ``db += Σ_{n, positions} dy``; ``dW_g += dy_gᵀ @ cols_g``; ``dx = col2im(dy_g @
    W_g)`` (overlapping windows add up) or, for stride 1, the equal "full" convolution of ``dy``
    with the flipped kernels (:meth:`ConvPlan.backward`).

    On the host, stride-1 3x3 and 5x5 kernels with 16+ channels in and out and outputs of 8+ a
    side run Winograd's F(4×4, r×r) instead (:mod:`pycaffe_mpi.kernels.winograd`: the same
    products with float32 rounding differences up to ~1e-5 of the output's scale), unless the
    layer asks for ``engine: CAFFE``.

    On the host a 2-D depthwise convolution (``group == C``, ``O = m·C``) computes the same
    formulas without im2col (:class:`pycaffe_mpi.kernels.depthwise.Depthwise`, where the
    measured gain is noted).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().setup(bottom, top)
        # NOTE: on the host a 2-D depthwise convolution (group == channels) runs its own loops
        # instead of the plan's im2col GEMMs (kernels/depthwise.py has the measured gain).
        self.depthwise = None
        if (not self.backend.is_gpu and len(self.geom.kernel) == 2
                and self.group == self.channels):
            from pycaffe_mpi.kernels import depthwise  # imports numba: only when needed

            g = self.geom
            self.depthwise = depthwise.Depthwise(g.kernel, g.stride, g.pad, g.dilation)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = self._check_bottoms(bottom)
        g = self.geom
        self.out = im2col_k.conv_output_shape(self.spatial, g.kernel, g.stride, g.pad,
                                              g.dilation)
        self.require(all(o > 0 for o in self.out), "convolution_param",
                     f"input spatial size {self.spatial} is smaller than the dilated kernel "
                     f"(kernel {g.kernel}, dilation {g.dilation}, pad {g.pad})")
        if self.depthwise is None:
            self.plan.reshape(self.num, self.spatial)
        for t in top:
            t.reshape((*shape[: self.axis], self.num_output, *self.out))

    def _planes(self, a: Any, channels: int, spatial: Sequence[int]) -> Any:
        """``a`` as ``(N, channels, H, W)`` for the depthwise kernels."""
        return a.reshape(self.num, channels, *spatial)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        bias = self.blobs[1].data if self.bias_term else None
        for b, t in zip(bottom, top):
            if self.depthwise is not None:
                self.depthwise.forward(self._planes(b.data, self.channels, self.spatial),
                                       self.blobs[0].data, bias,
                                       self._planes(t.data, self.num_output, self.out))
            else:
                self.plan.forward(b.data, self.blobs[0].data, t.data, bias)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        for i, (t, b) in enumerate(zip(top, bottom)):
            dx = b.diff if propagate_down[i] else None
            if self.depthwise is not None:
                self.depthwise.backward(
                    self._planes(b.data, self.channels, self.spatial), self.blobs[0].data,
                    self._planes(t.diff, self.num_output, self.out), self.blobs[0].diff,
                    self.blobs[1].diff if self.bias_term else None,
                    None if dx is None else self._planes(dx, self.channels, self.spatial))
                continue
            if self.bias_term:
                self._add_bias_diff(t.diff)
            self.plan.backward(t.diff, b.data, self.blobs[0].data, self.blobs[0].diff, dx)


@register_layer("Deconvolution")
class Deconvolution(_BaseConvolution):
    """Transposed convolution (Caffe's ``Deconvolution``): the adjoint of a Convolution with the
    same ``convolution_param`` geometry, mapping its output shape back to its input shape.

    Bottom i → top i (any number of pairs, all bottoms the same shape, shared weights).

    Shapes:
        bottom: ``(*lead, C, *S)``, ``C`` at ``axis`` (default 1), ``N = Π lead``.
        top: ``(*lead, O, *Out)``,
        ``Out_d = stride_d·(S_d − 1) + dil_d·(k_d − 1) + 1 − 2·pad_d``.
        blobs: weight ``(C, O/group, *k)`` (Caffe's order: input channels first); bias ``(O,)``
        when ``bias_term``.

    Params (``convolution_param``), as Convolution's: num_output O (required), bias_term (true),
    kernel_size or kernel_h/kernel_w (required), stride (1) or stride_h/stride_w, pad (0) or
    pad_h/pad_w, dilation (1), group (1), weight_filler / bias_filler (constant 0), axis (1).

    Forward: ``y[n, o, q·s − pad + k·dil] += Σ_{c in o's group} W[c, o − g·Og, k] · x[n, c, q]``
    over input positions q and kernel offsets k (positions outside ``Out`` dropped), ``+ b[o]``;
    i.e. ``y = col2im(W_gᵀ x_g)``, the convolution's input gradient.

    Backward: ``db += Σ_{n, positions} dy``; ``dx = conv(dy, W)`` (the convolution's forward:
    ``dx[n, c, q] = Σ_{o, k} W[c, o, k] · dy[n, o, q·s − pad + k·dil]``) and
    ``dW[c, o, k] += Σ_{n, q} x[n, c, q] · dy[n, o, q·s − pad + k·dil]``.
    """

    reverse = True

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = self._check_bottoms(bottom)
        g = self.geom
        self.out = tuple(s * (i - 1) + e - 2 * q for i, s, e, q in
                         zip(self.spatial, g.stride, g.extent(), g.pad))
        self.require(all(o > 0 for o in self.out), "convolution_param",
                     f"output spatial size {self.out} is not positive (input {self.spatial}, "
                     f"kernel {g.kernel}, stride {g.stride}, dilation {g.dilation}, pad {g.pad})")
        self.plan.reshape(self.num, self.out)
        for t in top:
            t.reshape((*shape[: self.axis], self.num_output, *self.out))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for b, t in zip(bottom, top):
            self.plan.backward(b.data, None, self.blobs[0].data, dx=t.data)
            if self.bias_term:
                y = t.data.reshape(self.num, self.num_output, -1)
                y += self.blobs[1].data.reshape(-1, 1)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        for i, (t, b) in enumerate(zip(top, bottom)):
            if self.bias_term:
                self._add_bias_diff(t.diff)
            w, dw = self.blobs[0].data, self.blobs[0].diff
            if propagate_down[i]:  # dx and dW from one im2col of dy
                self.plan.forward(t.diff, w, b.diff, dy=b.data, dw=dw)
            else:
                self.plan.backward(b.data, t.diff, w, dw=dw)


@register_layer("Im2col")
class Im2col(Layer):
    """The windows of a convolution as channels (Caffe's ``Im2col``).

    Shapes:
        bottom: ``(*lead, C, *S)``, ``C`` at ``axis`` (default 1), ``N = Π lead``.
        top: ``(*lead, C·Πk, *Out)``, ``Out`` as Convolution's.

    Params (``convolution_param``): kernel_size or kernel_h/kernel_w (required), stride (1) or
    stride_h/stride_w, pad (0) or pad_h/pad_w, dilation (1), axis (1). num_output, group,
    bias_term and the fillers are not used.

    Forward: ``y[n, c·Πk + k, q] = x[n, c, q·s − pad + k·dil]`` (0 outside the image; ``k`` the
    row-major flat kernel offset).

    Backward: ``dx = col2im(dy)``: ``dx[n, c, p] = Σ_{k, q: q·s − pad + k·dil = p}
    dy[n, c·Πk + k, q]`` (overlapping windows add up).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.convolution_param
        shape = bottom[0].shape
        self.axis = _channel_axis(self, p, shape)
        self.num_axes = len(shape)
        self.geom = ConvGeometry(self, p, len(shape) - self.axis - 1)
        self._bufs = scratch.Buffers(self.xp, self.dtype)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = tuple(bottom[0].shape)
        self.require(len(shape) == self.num_axes, "bottom",
                     f"bottom num_axes may not change (was {self.num_axes}, now {len(shape)})")
        g = self.geom
        self.num, self.channels = math.prod(shape[: self.axis]), shape[self.axis]
        self.spatial = shape[self.axis + 1:]
        self.out = im2col_k.conv_output_shape(self.spatial, g.kernel, g.stride, g.pad,
                                              g.dilation)
        self.require(all(o > 0 for o in self.out), "convolution_param",
                     f"input spatial size {self.spatial} is smaller than the dilated kernel "
                     f"(kernel {g.kernel}, dilation {g.dilation}, pad {g.pad})")
        top[0].reshape((*shape[: self.axis], self.channels * math.prod(g.kernel), *self.out))

    def _buffers(self) -> tuple[Any, Any]:
        """``cols`` ``(1, C, *K, N, *Out)`` (channels-first, one group) and the padded input."""
        g = self.geom
        cols = self._bufs.get("cols", im2col_k.cols_shape(self.num, self.channels, self.out,
                                                          g.kernel, 1, False))
        xpad = self._bufs.get("xpad", im2col_k.padded_shape(
            (self.num, self.channels, *self.spatial), g.pad, False), fill=0.0)
        return cols, xpad

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        g, (cols, xpad) = self.geom, self._buffers()
        x = bottom[0].data.reshape(self.num, self.channels, *self.spatial)
        im2col_k.im2col(self.xp, x, cols, xpad, g.kernel, g.stride, g.pad, g.dilation, 1, False)
        rows = self.channels * math.prod(g.kernel)
        y = top[0].data.reshape(self.num, rows, -1)
        y[...] = cols.reshape(rows, self.num, -1).transpose(1, 0, 2)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        g, (cols, xpad) = self.geom, self._buffers()
        rows = self.channels * math.prod(g.kernel)
        cols.reshape(rows, self.num, -1)[...] = \
            top[0].diff.reshape(self.num, rows, -1).transpose(1, 0, 2)
        dx = bottom[0].diff.reshape(self.num, self.channels, *self.spatial)
        # NOTE: col2im overwrites all of its scratch, so not im2col's xpad (whose border is zero)
        dxpad = self._bufs.get("dxpad", xpad.shape)
        im2col_k.col2im(self.xp, cols, dx, dxpad, g.kernel, g.stride, g.pad, g.dilation, 1,
                        False)
