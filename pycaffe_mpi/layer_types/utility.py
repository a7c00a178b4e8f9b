"""Utility layers: ArgMax, BatchReindex, Filter, Silence, Tile, Parameter, Embed, Reduction.

Index-valued bottoms (BatchReindex's indices, Filter's selector, Embed's input) hold floats, as
everywhere in Caffe, truncated to integers like Caffe's ``static_cast<int>``; they never take a
gradient (``allow_force_backward`` is False and asking for one is an error, as in Caffe).
Scatter-adds (BatchReindex, Embed backward) use ``xp.bincount`` with weights, which NumPy and
CuPy both have, so repeated indices add up without a Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import layer as layer_mod
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.layer_types.neuron import refuse_backward
from pycaffe_mpi.registry import register_layer

_count = layer_mod.count_of
_canonical_axis = layer_mod.canonical_axis


def _refuse_index_gradient(layer: Layer, propagate_down: Sequence[bool], i: int, what: str) -> None:
    """Caffe's ``CHECK(!propagate_down[i])`` for an index bottom."""
    if len(propagate_down) > i and propagate_down[i]:
        where = errors.layer_where(layer.layer_param, layer.location)
        raise errors.NetError(f"{where} cannot backpropagate to {what} (bottom {i}); "
                              "set propagate_down: false for it")


def _scatter_add_rows(xp: Any, index: Any, rows: Any, n: int) -> Any:
    """out (n, D) with out[index[m]] += rows[m] for every m (repeats add up)."""
    d = rows.shape[1]
    flat = (index[:, None] * d + xp.arange(d)[None, :]).reshape(-1)  # (M·D,)
    out = xp.bincount(flat, weights=rows.reshape(-1), minlength=n * d)
    return out.reshape(n, d)


def _indices(layer: Layer, values: Any, limit: int, field: str, what: str) -> Any:
    """``values`` truncated to int64, each checked to lie in [0, limit)."""
    idx = values.astype(np.int64)
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        layer.require(lo >= 0 and hi < limit, field,
                      f"{what} out of range: expected values in [0, {limit}), got {lo}..{hi}")
    return idx


def _argsort_desc(xp: Any, x: Any, k: int) -> Any:
    """Indices of the k largest along the last axis, largest first; equal values put the larger
    index first, as Caffe's partial_sort of (value, index) pairs with std::greater."""
    order = xp.argsort(x, axis=-1, kind="stable") if xp is np else xp.argsort(x, axis=-1)
    return order[..., ::-1][..., :k]


@register_layer("ArgMax")
class ArgMax(Layer):
    """Indices (and optionally values) of the top-k values. No backward in Caffe: asking for one
    raises ``NotImplementedError``.

    Params (``argmax_param``): top_k (1, >= 1), out_max_val (false), axis (unset: over the
    flattened dims of each item; negative counts from the end).

    Shapes:
        bottom[0]: (N, …). Without axis, each item's D = count(1) values are ranked.
        top[0]: without axis, (N, 1, k) or (N, 2, k) with out_max_val (indices, then values),
            padded with trailing 1s to the bottom's number of axes; with axis, the bottom's
            shape with k on the axis, holding indices (values with out_max_val).

    Forward: the k largest values, largest first (ties: larger index first, as Caffe).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.argmax_param
        self.top_k, self.out_max_val = int(p.top_k), bool(p.out_max_val)
        self.has_axis = p.HasField("axis")
        self.axis_param = int(p.axis)
        self.require(self.top_k >= 1, "argmax_param.top_k",
                     f"top k must not be less than 1, got {self.top_k}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if self.has_axis:
            self.axis = _canonical_axis(self, self.axis_param, len(shape), "argmax_param.axis")
            self.require(self.top_k <= shape[self.axis], "argmax_param.top_k",
                         f"top_k {self.top_k} must be <= the dimension of axis {self.axis} "
                         f"({shape[self.axis]})")
            top[0].reshape(*shape[:self.axis], self.top_k, *shape[self.axis + 1:])
            return
        self.require(self.top_k <= _count(shape, 1), "argmax_param.top_k",
                     f"top_k {self.top_k} must be <= the dimension of the flattened bottom "
                     f"blob per instance ({_count(shape, 1)})")
        out = [1] * max(3, len(shape))
        out[0], out[1], out[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        top[0].reshape(out)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x, k = self.xp, bottom[0].data, self.top_k
        if self.has_axis:
            xm = xp.moveaxis(x, self.axis, -1)
            order = _argsort_desc(xp, xm, k)
            out = xp.take_along_axis(xm, order, axis=-1) if self.out_max_val else order
            top[0].data[...] = xp.moveaxis(out, -1, self.axis)
            return
        x2 = x.reshape(x.shape[0], -1)  # (N, D)
        order = _argsort_desc(xp, x2, k)  # (N, k)
        y = top[0].data.reshape(x.shape[0], -1)  # (N, k) or (N, 2k)
        y[:, :k] = order
        if self.out_max_val:
            y[:, k:] = xp.take_along_axis(x2, order, axis=1)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        refuse_backward(self, propagate_down)


@register_layer("BatchReindex")
class BatchReindex(Layer):
    """Select (and repeat) items of a batch by index.

    Shapes:
        bottom[0]: data, (N, …). bottom[1]: indices, (M,), values in [0, N).
        top[0]: (M, …), top[m] = bottom[0][indices[m]].

    Backward: dE/dbottom0[n] = Σ_{m: indices[m] = n} dE/dtop[m] (zero for unused items);
    the indices take no gradient.
    """

    exact_num_bottom = 2
    exact_num_top = 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.require(bottom[1].num_axes == 1, "bottom",
                     f"the index bottom must be 1-D, got shape {bottom[1].shape}")
        self.require(bottom[0].num_axes >= 1, "bottom", "the data bottom needs a batch axis")
        top[0].reshape(bottom[1].shape[0], *bottom[0].shape[1:])

    def _index(self, bottom: Sequence[Blob]) -> Any:
        return _indices(self, bottom[1].data, bottom[0].shape[0], "bottom",
                        "index specified for the reindex layer (batch size "
                        f"{bottom[0].shape[0]})")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data[self._index(bottom)]

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        _refuse_index_gradient(self, propagate_down, 1, "the index")
        if not propagate_down[0]:
            return
        n, m = bottom[0].shape[0], top[0].shape[0]
        rows = top[0].diff.reshape(m, -1)  # (M, D)
        bottom[0].diff[...] = _scatter_add_rows(self.xp, self._index(bottom), rows, n).reshape(
            bottom[0].shape)


@register_layer("Filter")
class Filter(Layer):
    """Keep the items whose selector is non-zero, in every bottom but the selector.

    Shapes:
        bottom[0..K−1]: (N, …) each. bottom[K] (last): selector, (N,) or (N, 1, …).
        top[0..K−1]: (S, …), the S selected items in order. (Caffe's first reshape, before any
        data, gives N rows so the net can set up; forward then shapes the tops to S.)

    Backward: dE/dbottom_i = dE/dtop_i on the selected items, zero elsewhere; the selector
    takes no gradient.
    """

    min_bottom = 2
    min_top = 1
    _selector_index = -1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != self._selector_index

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.require(len(top) == len(bottom) - 1, "top",
                     f"expected one top per filtered bottom ({len(bottom) - 1}), got {len(top)}")
        self._selector_index = len(bottom) - 1
        self._first = True

    def _select(self, bottom: Sequence[Blob]) -> Any:
        sel = bottom[-1]
        self.require(all(d == 1 for d in sel.shape[1:]), "bottom",
                     f"selector blob dimensions must be singletons (1), except the first; got "
                     f"{sel.shape}")
        for i, b in enumerate(bottom[:-1]):
            self.require(b.shape[:1] == sel.shape[:1], "bottom",
                         f"each bottom should have the same 0th dimension as the selector "
                         f"blob: bottom[{i}] is {b.shape}, the selector {sel.shape}")
        return self.xp.flatnonzero(sel.data.reshape(-1))

    def _shape_tops(self, bottom: Sequence[Blob], top: Sequence[Blob], n: int) -> None:
        for b, t in zip(bottom, top):
            t.reshape(n, *b.shape[1:])

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.index = self._select(bottom)
        n = bottom[0].shape[0] if self._first else int(self.index.size)
        self._first = False
        self._shape_tops(bottom, top, n)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.index = self._select(bottom)
        self._shape_tops(bottom, top, int(self.index.size))
        for b, t in zip(bottom, top):
            t.data[...] = b.data[self.index]

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        _refuse_index_gradient(self, propagate_down, len(bottom) - 1, "the selector")
        for i, t in enumerate(top):
            if propagate_down[i]:
                bottom[i].diff[...] = 0
                bottom[i].diff[self.index] = t.diff


@register_layer("Silence")
class Silence(Layer):
    """Swallow bottoms so they are not reported as net outputs.

    Shapes: bottom[i] any shape, no tops.

    Forward: nothing. Backward: dE/dbottom_i = 0 (as Caffe, so a shared blob's diff is
    defined).
    """

    min_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        pass

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        pass

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


@register_layer("Tile")
class Tile(Layer):
    """Repeat a blob along one axis.

    Params (``tile_param``): axis (1; negative counts from the end), tiles (required, > 0).

    Shapes:
        bottom[0]: (d_0, …, d_axis, …), viewed as (outer, inner) with outer = Π d_{<axis}.
        top[0]: the same with d_axis · tiles on the axis.

    Forward:  top = [x_i, x_i, …] (tiles copies of each outer item's inner block).
    Backward: dE/dx = Σ over the tiles copies of dE/dtop.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.tile_param
        self.require(p.HasField("tiles"), "tile_param.tiles", "number of tiles must be specified")
        self.tiles, self.axis_param = int(p.tiles), int(p.axis)
        self.require(self.tiles > 0, "tile_param.tiles",
                     f"number of tiles must be positive, got {self.tiles}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        axis = _canonical_axis(self, self.axis_param, len(shape), "tile_param.axis")
        self.outer, self.inner = _count(shape, 0, axis), _count(shape, axis)
        top[0].reshape(*shape[:axis], shape[axis] * self.tiles, *shape[axis + 1:])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        y = top[0].data.reshape(self.outer, self.tiles, self.inner)
        y[...] = bottom[0].data.reshape(self.outer, 1, self.inner)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, self.inner)
            bottom[0].diff[...] = dy.sum(axis=1).reshape(bottom[0].shape)


@register_layer("Parameter")
class Parameter(Layer):
    """A learnable blob as a top (no bottoms).

    Params: ``parameter_param.shape`` (a BlobShape). The blob starts at zero, as in Caffe.

    Shapes: blobs[0] and top[0]: that shape.

    Forward:  top = blobs[0]. Backward: dE/dblobs[0] += dE/dtop. (Caffe makes the top share
    the blob's data and diff; a copy here keeps the rule that parameter diffs accumulate.)
    """

    exact_num_bottom = 0
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.shape = tuple(int(d) for d in self.layer_param.parameter_param.shape.dim)
        if len(self.blobs) == 0:
            self.blobs.append(self.new_blob(self.shape))
        got = tuple(self.blobs[0].shape)
        self.require(got == self.shape, "parameter_param.shape",
                     f"expected a parameter of shape {self.shape}, got {got}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(self.shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = self.blobs[0].data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        self.blobs[0].diff[...] += top[0].diff


@register_layer("Embed")
class Embed(Layer):
    """Lookup table: each integer index becomes a learned vector (plus a bias).

    Params (``embed_param``): num_output N (> 0), input_dim K (> 0), bias_term (true),
    weight_filler / bias_filler (constant 0).

    Shapes:
        bottom[0]: indices, any shape (M values in [0, K), integers held as floats).
        top[0]: bottom shape + (N,).
        blobs[0]: W, (K, N). blobs[1]: b, (N,) when bias_term.

    Forward:  top[m] = W[index_m] + b.
    Backward: dW[k] += Σ_{m: index_m = k} dE/dtop[m]; db += Σ_m dE/dtop[m]; the indices take
    no gradient.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.embed_param
        self.N, self.K, self.bias_term = int(p.num_output), int(p.input_dim), bool(p.bias_term)
        self.require(self.N > 0, "embed_param.num_output", "num_output must be positive")
        self.require(self.K > 0, "embed_param.input_dim", "input_dim must be positive")
        shapes = [(self.K, self.N), (self.N,)] if self.bias_term else [(self.K, self.N)]
        self.init_param_blobs(shapes, "embed_param", ["weight_filler", "bias_filler"][:len(shapes)])

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(*bottom[0].shape, self.N)

    def _index(self, bottom: Sequence[Blob]) -> Any:
        x = bottom[0].data.reshape(-1)
        idx = _indices(self, x, self.K, "embed_param.input_dim", "embed layer input")
        self.require(bool((idx == x).all()), "bottom", "embed layer input must be integers")
        return idx

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        y = top[0].data.reshape(-1, self.N)  # (M, N)
        y[...] = self.blobs[0].data[self._index(bottom)]
        if self.bias_term:
            y += self.blobs[1].data

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        _refuse_index_gradient(self, propagate_down, 0, "the embed layer input")
        dy = top[0].diff.reshape(-1, self.N)  # (M, N)
        self.blobs[0].diff[...] += _scatter_add_rows(self.xp, self._index(bottom), dy, self.K)
        if self.bias_term:
            self.blobs[1].diff[...] += dy.sum(axis=0)


_OPS = {1: "SUM", 2: "ASUM", 3: "SUMSQ", 4: "MEAN"}


@register_layer("Reduction")
class Reduction(Layer):
    """Reduce all axes from ``axis`` on to one number per leading item.

    Params (``reduction_param``): operation (SUM; ASUM, SUMSQ, MEAN), axis (0; negative counts
    from the end), coeff (1).

    Shapes:
        bottom[0]: (d_0, …), viewed as (num, dim) with num = Π d_{<axis}, dim = Π d_{>=axis}.
        top[0]: (d_0, …, d_{axis−1}) (shape () for axis 0).

    Forward:  y_i = coeff · Σ_j f(x_ij), f = x, |x|, x² or x / dim (MEAN).
    Backward: dE/dx_ij = coeff · dE/dy_i · f'(x_ij): 1, sign(x), 2x or 1 / dim.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.reduction_param
        self.op = _OPS[int(p.operation)]
        self.axis_param, self.coeff_param = int(p.axis), float(p.coeff)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        axis = _canonical_axis(self, self.axis_param, len(shape), "reduction_param.axis")
        self.num, self.dim = _count(shape, 0, axis), _count(shape, axis)
        top[0].reshape(shape[:axis])
        self.coeff = self.coeff_param / self.dim if self.op == "MEAN" else self.coeff_param

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == "ASUM":
            x = self.xp.abs(x)
        elif self.op == "SUMSQ":
            x = x * x
        y = top[0].data.reshape(self.num)
        x.sum(axis=1, out=y)
        if self.coeff != 1.0:
            y *= self.coeff

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        g = top[0].diff.reshape(self.num, 1) * self.coeff  # (num, 1)
        x = bottom[0].data.reshape(self.num, self.dim)
        dx = bottom[0].diff.reshape(self.num, self.dim)
        if self.op == "ASUM":
            dx[...] = g * self.xp.sign(x)
        elif self.op == "SUMSQ":
            dx[...] = 2 * g * x
        else:
            dx[...] = g
