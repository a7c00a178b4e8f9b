"""Common layers: InnerProduct, Softmax, Concat, Slice, Split, Eltwise, Flatten, Reshape.

Caffe makes the tops of Split, Flatten and Reshape (and a one-bottom Concat / one-top Slice)
share the bottom's memory. Here every top owns its memory and forward/backward copy: the copy
costs one pass over the blob, and keeps the Net free of aliasing surprises (an in-place layer
after a Split top can never overwrite the other tops' data).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import layer as layer_mod
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import softmax as softmax_kernel
from pycaffe_mpi.kernels import threads
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

_count = layer_mod.count_of
_canonical_axis = layer_mod.canonical_axis


def _axis_fields(layer: Layer, p: Any, legacy_field: str, msg: str) -> tuple[int | None, int]:
    """(legacy ``*_dim`` or None, ``axis``) of a Concat/Slice parameter; both set is an error."""
    layer.require(not (p.HasField("axis") and p.HasField(legacy_field)), msg,
                  f"either axis or {legacy_field} should be specified; not both")
    legacy = int(getattr(p, legacy_field)) if p.HasField(legacy_field) else None
    return legacy, int(p.axis)


def _resolve_axis(layer: Layer, legacy_dim: int | None, axis: int, ndim: int, msg: str,
                  legacy_field: str) -> int:
    """The axis of Concat/Slice: the legacy ``*_dim`` (non-negative) when given, else ``axis``
    (Caffe's canonical form; negative counts from the end)."""
    if legacy_dim is None:
        return _canonical_axis(layer, axis, ndim, f"{msg}.axis")
    layer.require(legacy_dim < ndim, f"{msg}.{legacy_field}",
                  f"{legacy_field} {legacy_dim} out of range for a {ndim}-D bottom")
    return legacy_dim


def _along(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    """An index selecting ``start:stop`` on ``axis`` and everything on the axes before it."""
    return (slice(None),) * axis + (slice(start, stop),)


@register_layer("InnerProduct")
class InnerProduct(Layer):
    """Fully connected layer.

    Params (``inner_product_param``): num_output N (required), bias_term (true),
    weight_filler / bias_filler (constant 0), axis (1), transpose (false).

    Shapes:
        bottom[0]: (d_0, …, d_{axis−1}, d_axis, …) viewed as X of shape (M, K) with
            M = d_0·…·d_{axis−1} and K = d_axis·…·d_last (K is fixed at setup).
        top[0]: (d_0, …, d_{axis−1}, N).
        blobs[0]: W, (N, K), or (K, N) with transpose. blobs[1]: b, (N,) when bias_term.

    Forward:  Y = X·Wᵀ + b (transpose: Y = X·W + b).
    Backward: dX = dY·W (transpose: dY·Wᵀ); dW += dYᵀ·X (transpose: Xᵀ·dY); db += Σ_rows dY.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.inner_product_param
        self.num_output = int(p.num_output)
        self.bias_term = bool(p.bias_term)
        self.transpose = bool(p.transpose)
        self.axis_param = int(p.axis)
        self.require(self.num_output > 0, "inner_product_param.num_output",
                     f"expected a positive number of outputs, got {self.num_output}")
        axis = _canonical_axis(self, self.axis_param, bottom[0].num_axes,
                               "inner_product_param.axis")
        self.K = _count(bottom[0].shape, axis)
        n, k = self.num_output, self.K
        w_shape = (k, n) if self.transpose else (n, k)
        shapes = [w_shape, (n,)] if self.bias_term else [w_shape]
        self.init_param_blobs(shapes, "inner_product_param",
                              ["weight_filler", "bias_filler"][:len(shapes)])

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        axis = _canonical_axis(self, self.axis_param, len(shape), "inner_product_param.axis")
        self.require(_count(shape, axis) == self.K, "inner_product_param",
                     f"input size incompatible with inner product parameters: expected "
                     f"{self.K} values from axis {axis} on, got bottom shape {shape}")
        self.M = _count(shape, 0, axis)
        top[0].reshape(*shape[:axis], self.num_output)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(self.M, self.K)
        y = top[0].data.reshape(self.M, self.num_output)
        w = self.blobs[0].data
        self.xp.matmul(x, w if self.transpose else w.T, out=y)  # (M, N)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        dy = top[0].diff.reshape(self.M, self.num_output)
        x = bottom[0].data.reshape(self.M, self.K)
        w = self.blobs[0]
        if self.transpose:
            w.diff[...] += x.T @ dy  # (K, N)
        else:
            w.diff[...] += dy.T @ x  # (N, K)
        if self.bias_term:
            self.blobs[1].diff[...] += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.M, self.K)
            self.xp.matmul(dy, w.data.T if self.transpose else w.data, out=dx)


@register_layer("Softmax")
class Softmax(Layer):
    """Softmax over one axis.

    Params: ``softmax_param.axis`` (1; negative counts from the end).

    Shapes: bottom[0] any shape with the axis; top[0] the same.

    Forward:  y = exp(x) / Σ_axis exp(x) (max-shifted, stable).
    Backward: dE/dx = y · (dE/dy − Σ_axis dE/dy · y).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.axis_param = int(self.layer_param.softmax_param.axis)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.axis = _canonical_axis(self, self.axis_param, bottom[0].num_axes,
                                    "softmax_param.axis")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = softmax_kernel.softmax(self.xp, bottom[0].data, self.axis)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        y, dy = top[0].data, top[0].diff
        dot = (dy * y).sum(axis=self.axis, keepdims=True)
        bottom[0].diff[...] = y * (dy - dot)


@register_layer("Concat")
class Concat(Layer):
    """Concatenation of the bottoms along one axis.

    Params (``concat_param``): axis (1; negative counts from the end) or the legacy
    concat_dim (non-negative), not both.

    Shapes: bottom[i] (…, c_i, …) equal except on the axis; top[0] (…, Σ c_i, …).

    Forward:  top = [bottom_0 | bottom_1 | …] along the axis.
    Backward: dE/dbottom_i = the slice of dE/dtop that bottom_i filled.
    """

    min_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.legacy_dim, self.axis_param = _axis_fields(
            self, self.layer_param.concat_param, "concat_dim", "concat_param")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape0 = bottom[0].shape
        self.axis = _resolve_axis(self, self.legacy_dim, self.axis_param, len(shape0),
                                  "concat_param", "concat_dim")
        sizes = []
        for i, b in enumerate(bottom):
            same = len(b.shape) == len(shape0) and all(
                d == d0 for j, (d, d0) in enumerate(zip(b.shape, shape0)) if j != self.axis)
            self.require(same, "concat_param.axis",
                         f"all inputs must have the same shape except at axis {self.axis}; "
                         f"bottom[0] is {shape0}, bottom[{i}] is {b.shape}")
            sizes.append(b.shape[self.axis])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        top[0].reshape(*shape0[:self.axis], self.offsets[-1], *shape0[self.axis + 1:])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for i, b in enumerate(bottom):
            top[0].data[_along(self.axis, self.offsets[i], self.offsets[i + 1])] = b.data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        for i, b in enumerate(bottom):
            if propagate_down[i]:
                b.diff[...] = top[0].diff[_along(self.axis, self.offsets[i], self.offsets[i + 1])]


@register_layer("Slice")
class Slice(Layer):
    """Slices the bottom along one axis into several tops (the inverse of Concat).

    Params (``slice_param``): axis (1; negative counts from the end) or the legacy slice_dim
    (non-negative), not both; slice_point (increasing cut indices, one fewer than the tops;
    none = equal parts, which must divide the axis).

    Shapes: bottom[0] (…, C, …); top[j] (…, c_j, …) with Σ c_j = C.

    Forward:  top_j = bottom[…, p_j : p_{j+1}, …] with p_0 = 0 and p_last = C.
    Backward: dE/dbottom = [dE/dtop_0 | dE/dtop_1 | …] along the axis.
    """

    exact_num_bottom = 1
    min_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.slice_param
        self.legacy_dim, self.axis_param = _axis_fields(self, p, "slice_dim", "slice_param")
        self.slice_point = [int(s) for s in p.slice_point]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        self.axis = _resolve_axis(self, self.legacy_dim, self.axis_param, len(shape),
                                  "slice_param", "slice_dim")
        dim, n = shape[self.axis], len(top)
        if self.slice_point:
            self.require(len(self.slice_point) == n - 1, "slice_param.slice_point",
                         f"expected {n - 1} slice points for {n} tops, "
                         f"got {len(self.slice_point)}")
            points = [0, *self.slice_point, dim]
            self.require(all(a < b for a, b in itertools.pairwise(points)),
                         "slice_param.slice_point",
                         f"slice points must increase strictly within (0, {dim}) on axis "
                         f"{self.axis}, got {self.slice_point}")
        else:
            self.require(dim % n == 0, "slice_param",
                         f"number of top blobs ({n}) should evenly divide the input slice "
                         f"axis {self.axis} of size {dim}; give slice_point to cut unevenly")
            points = [dim // n * j for j in range(n + 1)]
        self.points = points
        for j, t in enumerate(top):
            t.reshape(*shape[:self.axis], points[j + 1] - points[j], *shape[self.axis + 1:])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for j, t in enumerate(top):
            t.data[...] = bottom[0].data[_along(self.axis, self.points[j], self.points[j + 1])]

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        for j, t in enumerate(top):
            bottom[0].diff[_along(self.axis, self.points[j], self.points[j + 1])] = t.diff


_GRAIN = 1 << 16  # elements: smaller blobs are not split between the cores


@register_layer("Split")
class Split(Layer):
    """One bottom fed to several consumers (the Net inserts it for blobs used more than once).

    Shapes: bottom[0] any; top[j] the same shape (never the bottom blob itself).

    Forward:  top_j = bottom for every j.
    Backward: dE/dbottom = Σ_j dE/dtop_j.

    The tops share the bottom's data, as in Caffe (no copy, no memory), once the Net has set
    ``share_data``: it does unless a later layer writes the bottom or a top (which would change
    every branch; nets refuse such in-place use of a split blob anyway), else the tops are
    copies.
    NOTE: ResNet-50 at batch 8: its 16 Splits copied 230 MiB of activations per forward.
    """

    exact_num_bottom = 1
    min_top = 1
    share_data = False

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for j, t in enumerate(top):
            self.require(t is not bottom[0], "top",
                         f"Split does not allow in-place computation (top[{j}] is the bottom)")
            if self.share_data:
                t.share_data(bottom[0])
            else:
                t.reshape_like(bottom[0])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.share_data:
            return
        for t in top:
            t.data[...] = bottom[0].data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        if self.xp is not np:
            dx[...] = top[0].diff
            for t in top[1:]:
                dx += t.diff
            return
        dxf, dys = dx.reshape(-1), [t.diff.reshape(-1) for t in top]

        def part(lane: int, lo: int, hi: int) -> None:  # split between the cores
            if len(dys) == 1:
                dxf[lo:hi] = dys[0][lo:hi]
                return
            np.add(dys[0][lo:hi], dys[1][lo:hi], out=dxf[lo:hi])
            for dy in dys[2:]:
                dxf[lo:hi] += dy[lo:hi]

        threads.run(part, dxf.size, grain=_GRAIN)


_OP = caffe_pb2.EltwiseParameter  # the EltwiseOp values: PROD, SUM, MAX


@register_layer("Eltwise")
class Eltwise(Layer):
    """Elementwise product, (weighted) sum or maximum of two or more same-shaped bottoms.

    Params (``eltwise_param``): operation (PROD / SUM default / MAX); coeff (SUM only, one per
    bottom, default all 1); stable_prod_grad (true).

    Shapes: bottom[i] all the same shape; top[0] that shape.

    Forward:  PROD y = Π_i x_i; SUM y = Σ_i c_i·x_i; MAX y = max_i x_i.
    Backward: PROD dE/dx_i = dE/dy · Π_{j≠i} x_j; SUM dE/dx_i = c_i · dE/dy;
    MAX dE/dx_i = dE/dy where bottom i won the max, else 0. The winner is the first maximal
    bottom, except that a tie between bottoms 0 and 1 goes to bottom 1 (Caffe's loop).
    """

    min_bottom = 2
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.eltwise_param
        self.op = int(p.operation)
        n = len(bottom)
        self.require(len(p.coeff) in (0, n), "eltwise_param.coeff",
                     f"expected one coefficient per bottom ({n}), got {len(p.coeff)}")
        self.require(not (self.op == _OP.PROD and len(p.coeff)), "eltwise_param.coeff",
                     "coefficients are taken only by SUM (and ignored by MAX), not by PROD")
        self.coeff = [float(c) for c in p.coeff] if len(p.coeff) else [1.0] * n
        # NOTE: Caffe's stable_prod_grad: false divides top by bottom, which breaks at zeros;
        # the product of the other bottoms is used either way (same value where both exist).
        self.stable_prod_grad = bool(p.stable_prod_grad)
        self._winner = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for i, b in enumerate(bottom[1:], 1):
            self.require(b.shape == bottom[0].shape, "bottom",
                         f"all bottoms must have the same shape; bottom[0] is "
                         f"{bottom[0].shape}, bottom[{i}] is {b.shape}")
        top[0].reshape_like(bottom[0])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, y = self.xp, top[0].data
        if self.op == _OP.SUM and xp is np:
            yf, xs = y.reshape(-1), [b.data.reshape(-1) for b in bottom]

            def part(lane: int, lo: int, hi: int) -> None:  # split between the cores
                np.multiply(xs[0][lo:hi], self.coeff[0], out=yf[lo:hi])
                for c, x in zip(self.coeff[1:], xs[1:]):
                    yf[lo:hi] += x[lo:hi] if c == 1.0 else c * x[lo:hi]

            threads.run(part, yf.size, grain=_GRAIN)
        elif self.op == _OP.SUM:
            xp.multiply(bottom[0].data, self.coeff[0], out=y)
            for c, b in zip(self.coeff[1:], bottom[1:]):
                y += b.data if c == 1.0 else c * b.data
        elif self.op == _OP.PROD:
            y[...] = bottom[0].data
            for b in bottom[1:]:
                y *= b.data
        else:
            stacked = xp.stack([b.data for b in bottom])  # (n_bottom, *shape)
            winner = stacked.argmax(axis=0)
            # NOTE: Caffe compares bottoms 0 and 1 with `a > b`, so their tie goes to 1.
            winner[(winner == 0) & (bottom[0].data == bottom[1].data)] = 1
            self._winner = winner
            y[...] = stacked.max(axis=0)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        dy = top[0].diff
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == _OP.SUM and self.xp is np:
                dyf, dxf, c = dy.reshape(-1), b.diff.reshape(-1), self.coeff[i]
                threads.run(lambda lane, lo, hi, dyf=dyf, dxf=dxf, c=c: np.multiply(
                    dyf[lo:hi], c, out=dxf[lo:hi]), dyf.size, grain=_GRAIN)
            elif self.op == _OP.SUM:
                self.xp.multiply(dy, self.coeff[i], out=b.diff)
            elif self.op == _OP.PROD:
                others = [o.data for j, o in enumerate(bottom) if j != i]
                b.diff[...] = others[0]
                for o in others[1:]:
                    b.diff *= o
                b.diff *= dy
            else:
                b.diff[...] = dy * (self._winner == i)


class _SameData(Layer):
    """Base of layers whose top holds the bottom's values in another shape.

    The top owns its memory (a copy, so in-place writes through another consumer never reach
    the bottom). Subclasses only shape the top in ``reshape``.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data.reshape(top[0].shape)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register_layer("Flatten")
class Flatten(_SameData):
    """Merges the axes axis … end_axis into one.

    Params (``flatten_param``): axis (1), end_axis (−1); negative values count from the end.

    Shapes: bottom[0] (d_0, …, d_last); top[0] (d_0, …, d_{axis−1}, d_axis·…·d_end,
    d_{end+1}, …). Not in place.

    Forward: top = bottom, reshaped. Backward: dE/dbottom = dE/dtop, reshaped.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.flatten_param
        self.axis_param, self.end_axis_param = int(p.axis), int(p.end_axis)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.require(top[0] is not bottom[0], "top",
                     "Flatten does not allow in-place computation; give the top its own name")
        shape = bottom[0].shape
        start = _canonical_axis(self, self.axis_param, len(shape), "flatten_param.axis")
        end = _canonical_axis(self, self.end_axis_param, len(shape), "flatten_param.end_axis")
        self.require(start <= end, "flatten_param.end_axis",
                     f"end_axis {end} comes before axis {start} (bottom shape {shape})")
        top[0].reshape(*shape[:start], _count(shape, start, end + 1), *shape[end + 1:])



@register_layer("Reshape")
class Reshape(_SameData):
    """Gives the bottom a new shape without changing its data (Caffe's ReshapeLayer).

    Params (``reshape_param``): shape (dims; 0 = copy the bottom's dim at that position,
    −1 = infer from the count, at most one), axis (0) and num_axes (−1 = to the end): only
    the bottom axes [axis, axis + num_axes) are replaced by ``shape``. A negative axis counts
    from the end, −1 meaning "after the last axis".

    Shapes: top[0] = bottom dims before axis + new dims + bottom dims after the replaced
    range; same count as the bottom. Not in place.

    Forward: top = bottom, reshaped. Backward: dE/dbottom = dE/dtop, reshaped.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        self.axis_param, self.num_axes_param = int(p.axis), int(p.num_axes)
        self.require(all(d >= -1 for d in self.dims), "reshape_param.shape",
                     f"dims must be positive, 0 (copy) or -1 (infer), got {self.dims}")
        self.require(self.dims.count(-1) <= 1, "reshape_param.shape",
                     f"at most one dim may be -1 (inferred), got {self.dims}")
        self.require(self.num_axes_param >= -1, "reshape_param.num_axes",
                     f"expected num_axes >= 0, or -1 for all, got {self.num_axes_param}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.require(top[0] is not bottom[0], "top",
                     "Reshape does not allow in-place computation; give the top its own name")
        top[0].reshape(*self._top_shape(bottom[0].shape))

    def _top_shape(self, shape: tuple[int, ...]) -> list[int]:
        n = len(shape)
        a = self.axis_param
        start = a if a >= 0 else n + a + 1
        self.require(0 <= start <= n, "reshape_param.axis",
                     f"axis {a} out of range for a {n}-D bottom")
        end = n if self.num_axes_param == -1 else start + self.num_axes_param
        self.require(end <= n, "reshape_param.num_axes",
                     f"axis + num_axes = {end} is out of range for a {n}-D bottom")
        new = list(self.dims)
        for i, d in enumerate(new):
            if d == 0:
                self.require(start + i < n, "reshape_param.shape",
                             f"dim {i} is 0 (copy) but the bottom {shape} has no axis "
                             f"{start + i} to copy")
                new[i] = shape[start + i]
        out = [*shape[:start], *new, *shape[end:]]
        total = _count(shape)
        if -1 in new:
            known = _count([d for d in out if d != -1])
            self.require(known != 0 and total % known == 0, "reshape_param.shape",
                         f"bottom count ({total}) must be divisible by the product of the "
                         f"specified dimensions ({known}); bottom shape {shape}")
            out[start + new.index(-1)] = total // known
        self.require(_count(out) == total, "reshape_param.shape",
                     f"output count must match input count: bottom {shape} has {total}, "
                     f"the new shape {out} has {_count(out)}")
        return out

