"""The convolution plan: one N-D grouped convolution's layout, chunking, scratch and GEMMs.

Built on :mod:`~pycaffe_mpi.kernels.im2col` (the layouts and the unfold/fold copies, see its
module doc), :mod:`~pycaffe_mpi.kernels.scratch` (buffers) and, on the host,
:mod:`~pycaffe_mpi.kernels.threads` (the images split between the cores). The Convolution and
Deconvolution layers both run on it. On the host, stride-1 3x3 and 5x5 kernels with enough
channels run Winograd's minimal filtering instead of im2col (:mod:`~pycaffe_mpi.kernels.winograd`,
chosen in :meth:`ConvPlan.reshape`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi.kernels import cuda as cuda_k
from pycaffe_mpi.kernels import threads
from pycaffe_mpi.kernels.im2col import (
    Unfold,
    col2im,
    cols_shape,
    conv_output_shape,
    from_blob,
    padded_shape,
    to_blob,
)
from pycaffe_mpi.kernels.scratch import Workspace

CHUNK_BYTES = 6 << 20  # see ConvPlan.reshape
LARGE_OUTPUT = 784  # output positions (28x28) from which the host plan is channels-first
WINOGRAD_MIN_CHANNELS = 16  # see ConvPlan._winograd_tile
_TOKENS = itertools.count()


class _Lane:
    """One lane's im2col views of its buffers (the buffers themselves, pads and weight-gradient
    partial sums included, are the lane's shared :class:`~pycaffe_mpi.kernels.scratch.
    Workspace`)."""

    def __init__(self) -> None:
        self.views: dict[tuple[str, int], Any] = {}
        self.generation = -1


class ConvPlan:
    """One N-D grouped convolution ``y = conv(x, W)``: its geometry, the layout and chunking chosen
    for it, its scratch buffers, and the products built on them.

    ``x`` is ``(N, C, *S)``, ``W`` ``(O, C/G, *K)``, ``y`` ``(N, O, *Out)`` (any arrays of those
    sizes, C-contiguous). Convolution runs :meth:`forward` and :meth:`backward`; Deconvolution is
    the same plan read backwards (its bottom is ``y``, its top ``x``): its forward is
    :meth:`backward`'s input gradient and its input gradient is :meth:`forward`.

    On the host the images are split between the lanes of :mod:`~pycaffe_mpi.kernels.threads`
    (each lane its chunks, its scratch and its own weight-gradient sum, added in lane order).
    NOTE: CIFAR10-Quick, batch 100, 2 cores: the step's im2col/col2im copies and transposes ran
    on one core while BLAS used two (one thread 105 ms, two BLAS threads 73 ms).
    """

    def __init__(self, xp: Any, dtype: Any, channels: int, num_output: int, group: int,
                 kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                 dilation: Sequence[int], winograd: bool = True) -> None:
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.allow_winograd = winograd  # False: im2col products always (engine: CAFFE)
        self.channels, self.num_output, self.group = channels, num_output, group
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.pad, self.dilation = tuple(pad), tuple(dilation)
        self.is_1x1 = all(k == 1 and s == 1 and q == 0
                          for k, s, q in zip(self.kernel, self.stride, self.pad))
        self._lanes: list[_Lane] = []
        self._key: Any = None
        self._token = next(_TOKENS)  # owns its pads in the shared workspace (see _cols)
        self._wg_zero: Any = None  # Winograd's bias for none (see _winograd_tile)

    def reshape(self, num: int, spatial: Sequence[int]) -> None:
        """Plan for ``num`` images of ``spatial`` size (the caller checked ``Out > 0``)."""
        self.num, self.spatial = int(num), tuple(int(s) for s in spatial)
        self.out = conv_output_shape(self.spatial, self.kernel, self.stride, self.pad,
                                     self.dilation)
        # NOTE: for stride 1, dx is itself a convolution of dy; its im2col copy is cheaper than
        # col2im's strided adds, even with twice as many channels to copy (CIFAR10-quick conv3,
        # 32 → 64 channels: 7.3 → 5.8 ms backward).
        self.full_conv = (all(st == 1 for st in self.stride)
                          and self.num_output <= 2 * self.channels
                          and all(d * (k - 1) >= p for k, d, p in
                                  zip(self.kernel, self.dilation, self.pad)))
        # NOTE: the layout whose im2col copies the longer contiguous runs (see im2col's module
        # doc): channels-last for 32 channels, channels-first for CIFAR10-quick's 3-channel conv1.
        # Large outputs and (strided) 1x1 kernels go channels-first whatever the runs: there
        # the transposes into and out of the channels-last layout cost more than the short runs
        # (forward + backward, 2 cores, channels-first / channels-last: ResNet-50 b8 conv1 0.81,
        # 56x56 3x3 0.90, the 1x1 stride-2 projections to 28x28 0.72, to 14x14 0.83, to 7x7
        # 0.99; 28x28 and 14x14 3x3 0.98-1.02; CIFAR10-quick conv2 16x16 1.17, conv3 8x8 1.32).
        cg = self.channels // self.group
        self.channels_last = (cg * (self.kernel[-1] if self.dilation[-1] == 1 else 1)
                              >= (self.out[-1] if self.stride[-1] == 1 else 1)
                              and math.prod(self.out) < LARGE_OUTPUT
                              and math.prod(self.kernel) > 1)
        # NOTE: on a GPU 2-D im2col/col2im are CUDA kernels over the channels-first layout
        # (kernels/cuda.py), and the whole batch is one chunk: no cache to fit.
        self.on_host = self.xp is np and not cuda_k.enabled(self.xp)
        if not self.on_host and len(self.kernel) == 2:
            self.channels_last = False
        # NOTE: channels-first on the host goes image by image: the products then read and
        # write the blobs in place, where the batch-wide matrix needs a transposed copy of the
        # top (forward) and of its diff (weight gradient). CIFAR10-Quick conv1, batch 100,
        # one thread: those two copies were 5.3 of its 34 ms.
        self.per_image = not self.channels_last and self.on_host
        # NOTE: im2col writes ~Πk times the input, which the GEMM then reads back: over the whole
        # batch that streams through DRAM (82 MB for CIFAR10-quick conv2). In chunks of images
        # whose cols fit in the CPU cache the copy measured 3.5x faster and the GEMMs read cached
        # operands (conv2's forward: 11.2 → 5.8 ms). So the plan runs chunk by chunk, and
        # backward recomputes each chunk's cols instead of keeping them.
        # The padded input counts too: with stride 2 it is larger than the cols (ResNet-50's
        # 1x1 stride-2 projections took 7 images a chunk, 21 MiB of pad per lane).
        image_bytes = self.dtype.itemsize * max(
            math.prod(self.kernel) * self.channels * math.prod(self.out),  # cols, col2im's
            math.prod(self.kernel) * self.num_output * math.prod(self.spatial)
            if self.full_conv else 0,
            self.channels * math.prod(s + 2 * p for s, p in zip(self.spatial, self.pad)))
        self.chunk = (max(1, min(self.num, CHUNK_BYTES // image_bytes)) if self.on_host
                      else self.num)
        self.winograd = self._winograd_tile()
        key = (self.num, self.spatial, self.chunk)
        if self._key != key:
            self._key = key
            for lane in self._lanes:
                lane.views = {}  # im2col views of the buffers

    def _winograd_tile(self) -> int:
        """``m`` of the F(m×m, r×r) Winograd products (:mod:`~pycaffe_mpi.kernels.winograd`) this
        plan runs, or 0 for im2col: on the host, 2-D, square 3x3 or 5x5 kernels, stride and
        dilation 1, one group, at least 16 channels in and out, equal pads under ``r``.
        NOTE: forward + both gradients, 2 cores, Winograd / im2col (``bench/bench_winograd.py``,
        one run): ResNet-50 b8's 3x3 layers 56x56 0.61, 28x28 0.66, 14x14 0.89 (7x7: see
        ``winograd.tile_size``); CIFAR10-quick b100's 5x5 conv2 (16x16) 0.72, conv3 (8x8)
        0.54, at b350 0.64 and 0.49. Its 3-channel conv1 stays im2col (products with 3 rows)."""
        r = self.kernel[0]
        if not (self.allow_winograd and self.on_host and len(self.kernel) == 2
                and r in (3, 5) and self.kernel[1] == r and self.stride == (1, 1)
                and self.dilation == (1, 1) and self.group == 1
                and min(self.channels, self.num_output) >= WINOGRAD_MIN_CHANNELS
                and self.pad[0] == self.pad[1] < r
                and self.dtype in (np.float32, np.float64)):
            return 0
        from pycaffe_mpi.kernels import winograd  # numba on first use

        m = winograd.tile_size(self.out)
        if m:  # NOTE: made once per (m, r, dtype), not at every reshape (one a forward)
            self._wg, self._wgt = winograd, winograd.transforms(m, r, self.dtype.str)
            if self._wg_zero is None:
                self._wg_zero = np.zeros(max(self.channels, self.num_output), self.dtype)
        return m

    # -- lanes, shapes as 2-D / 3-D matrices ---------------------------------------------------
    def _run(self, fn: Any) -> list[Any]:
        """``fn(lane, lo, hi)`` over the images, split between the lanes on the host."""
        if self.on_host:
            return threads.run(fn, self.num)
        return [fn(0, 0, self.num)]

    def _lane(self, i: int) -> _Lane:
        while len(self._lanes) <= i:
            self._lanes.append(_Lane())
        lane = self._lanes[i]
        if lane.generation != Workspace.generation:  # views of buffers since replaced
            lane.views, lane.generation = {}, Workspace.generation
        return lane

    def _scratch(self, lane: int, name: str, shape: Sequence[int]) -> Any:
        """Workspace buffer ``name`` of ``lane``. NOTE: a few names serve every product, each
        for what is alive at once in one chunk: "cols" (an input's or dy's windows, and then
        col2im's), "cols_pad" (the padded image they are cut from), "out" and "dy" (products
        and blobs in a product's layout), "dxpad", the weight-gradient sums "dw" and "dwr" and
        a term on its way into one, "dw_term" (ResNet-50 b8: 13 names had 163 MiB of
        scratch). Winograd's transformed weights ``U`` use lane 0's "dw" before (never while)
        it holds a weight-gradient sum of the same size."""
        return Workspace.get(self.xp, lane, name, shape, self.dtype)

    def _dims(self) -> tuple[int, int, int, int, int, int]:
        """``(N, G, ΠK·Cg, Og, ΠOut, ΠS)``."""
        g = self.group
        ckg = self.channels // g * math.prod(self.kernel)
        return self.num, g, ckg, self.num_output // g, math.prod(self.out), math.prod(self.spatial)

    def _chunks(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """``(lo, hi)`` image ranges of ``lo..hi`` processed together (see :meth:`reshape`)."""
        return [(a, min(a + self.chunk, hi)) for a in range(lo, hi, self.chunk)]

    def _mat(self, lane: int, name: str, m: int, rows: int, positions: int) -> Any:
        """Scratch ``name`` for the product of ``m`` images: ``(G, m·positions, rows)``
        channels-last, ``(G, rows, m·positions)`` channels-first."""
        g = self.group
        return self._scratch(lane, name, (g, m * positions, rows) if self.channels_last
                             else (g, rows, m * positions))

    def _w_cols(self, w: Any, flip: bool = False) -> Any:
        """The weights as ``(G, Og, ΠK·Cg)`` in the order of a ``cols`` row (flipped kernels as
        ``(G, Og·ΠK, Cg)`` for the full convolution)."""
        _, g, ckg, og, _, _ = self._dims()
        nsp, cg, xp = len(self.kernel), self.channels // g, self.xp
        w = w.reshape(g, og, cg, *self.kernel)
        if flip:  # rot180 of every kernel, rows (k, o) or (o, k) as dy's cols
            w = w[(Ellipsis, *[slice(None, None, -1)] * nsp)]
            w = w.transpose(0, *range(3, 3 + nsp), 1, 2) if self.channels_last else \
                w.transpose(0, 1, *range(3, 3 + nsp), 2)
            return xp.ascontiguousarray(w).reshape(g, og * (ckg // cg), cg)
        if self.channels_last:
            w = xp.ascontiguousarray(xp.moveaxis(w, 2, -1))
        return w.reshape(g, og, ckg)

    def _cols(self, lane: int, x: Any, channels: int, spatial: Sequence[int],
              out: Sequence[int], pad: Sequence[int], stride: Sequence[int], tag: str,
              per_image: bool = False) -> Any:
        """The ``cols`` matrices ``(G, m·ΠOut, ΠK·Cg)`` (or transposed, channels-first; or
        ``(m, G, ΠK·Cg, ΠOut)`` ``per_image``) of the ``m`` images ``x`` ``(m, channels,
        *spatial)``, in ``lane``'s buffers named after ``tag``."""
        m, g, cl = x.shape[0], self.group, self.channels_last
        # NOTE: the padded input is shared scratch too; its zero border holds until another
        # plan writes the buffer, so it is cleared only then (once per call, not per chunk)
        xpad_all, fresh = Workspace.claim(self.xp, lane, "cols_pad", padded_shape(
            (self.chunk, channels, *spatial), pad, cl, per_image), self.dtype, (self._token, tag))
        if fresh:
            xpad_all[...] = 0
        state = self._lane(lane)
        view = state.views.get((tag, m))
        if view is None:  # the buffers' views for chunks of m images, made once
            cols = self._scratch(lane, "cols", cols_shape(m, channels, out, self.kernel, g, cl,
                                                       per_image))
            xpad = xpad_all[:m] if cl or per_image else xpad_all[:, :m]
            unfold = Unfold(self.xp, cols, xpad, x.shape, self.kernel, stride, pad,
                            self.dilation, g, cl, per_image)
            rows, positions = channels // g * math.prod(self.kernel), m * math.prod(out)
            shape = ((m, g, rows, positions // m) if per_image
                     else (g, positions, rows) if cl else (g, rows, positions))
            view = (unfold, cols.reshape(shape))
            state.views[(tag, m)] = view
        view[0](x)
        return view[1]

    def _x_cols(self, lane: int, x: Any) -> Any:
        """The ``cols`` of a chunk ``x`` of the input (see :meth:`_cols`)."""
        return self._cols(lane, x, self.channels, self.spatial, self.out, self.pad, self.stride,
                          "cols", self.per_image)

    # -- the products -----------------------------------------------------------------------------
    def forward(self, x: Any, w: Any, y: Any, bias: Any = None, dy: Any = None,
                dw: Any = None) -> None:
        """``y = conv(x, W) + bias`` (``bias`` ``(O,)`` or None), overwriting ``y``; with ``dy``
        and ``dw`` also ``dW += ∂E/∂W`` for that ``dy = ∂E/∂y``, from the same cols
        (Deconvolution's backward: one im2col of its top diff for both of its gradients).

        Per group g: ``y_g = cols_g @ W_gᵀ`` over chunks of images (channels-first: ``W_g @
        cols_g``); a 1×1 kernel with stride 1 and pad 0 skips im2col: ``y[n]_g = W_g @ x[n]_g``.
        """
        n, g, ckg, og, p, s = self._dims()
        xp = self.xp
        if self.winograd:
            self._wg_forward(x, w, y, bias)
            if dw is not None:
                self._wg_weight_grad(dy, x, dw)
            return
        bias = None if bias is None else bias.reshape(g, og, 1)
        if self.is_1x1:
            if dw is not None:
                self._backward_1x1(dy.reshape(n, g, og, p), x, w, dw, None)
            wg, xv, yv = w.reshape(g, og, ckg), x.reshape(n, g, ckg, s), y.reshape(n, g, og, p)

            def part_1x1(lane: int, lo: int, hi: int) -> None:
                # NOTE: one GEMM per image (broadcast over N), written straight into the top.
                xp.matmul(wg, xv[lo:hi], out=yv[lo:hi])
                if bias is not None:
                    yv[lo:hi] += bias

            self._run(part_1x1)
            return
        wc = self._w_cols(w)
        x, y = x.reshape(n, self.channels, *self.spatial), y.reshape(n, g, og, p)
        if dw is not None:
            dy = dy.reshape(n, g, og, p)

        def part(lane: int, lo: int, hi: int) -> Any:
            dwm = self._dw_sum(lane, lo, hi) if dw is not None else None
            for a, b in self._chunks(lo, hi):
                self._forward_chunk(lane, a, b, x, wc, y, bias, dy, dwm, a == lo)
            return dwm

        sums = self._run(part)
        if dw is not None:
            self._dw_finish(sums, dw)

    def _forward_chunk(self, lane: int, lo: int, hi: int, x: Any, wc: Any, y: Any, bias: Any,
                       dy: Any, dwm: Any, first: bool) -> None:
        """:meth:`forward` of images ``lo..hi`` (and their weight-gradient terms into ``dwm``,
        which they start when ``first``)."""
        _, _, _, og, p, _ = self._dims()
        xp, cl = self.xp, self.channels_last
        cols = self._x_cols(lane, x[lo:hi])
        if self.per_image:  # cols (m, G, ΠK·Cg, P), products straight into the top
            if dwm is not None:
                self._dw_add_per_image(lane, dwm, cols, dy[lo:hi], first)
            xp.matmul(wc, cols, out=y[lo:hi])
            if bias is not None:
                y[lo:hi] += bias
            return
        out = self._mat(lane, "out", hi - lo, og, p)
        if dwm is not None:
            self._dw_add(lane, dwm, cols, from_blob(dy[lo:hi], self._mat(lane, "dy", hi - lo, og,
                                                                     p), cl), first)
        if cl:
            xp.matmul(cols, wc.transpose(0, 2, 1), out=out)  # (G, m·P, Og)
        else:
            xp.matmul(wc, cols, out=out)  # (G, Og, m·P)
        to_blob(xp, out, y[lo:hi], bias, cl)

    def backward(self, dy: Any, x: Any, w: Any, dw: Any = None, dx: Any = None) -> None:
        """``dW += ∂E/∂W`` when ``dw`` is given (then ``x`` is needed) and ``dx = ∂E/∂x``
        (overwritten) when ``dx`` is given, from ``dy = ∂E/∂y``.

        ``dW_g += dy_gᵀ @ cols_g`` (cols recomputed per chunk) and ``dx = col2im(dy_g @ W_g)``
        (overlapping windows add up); or, for stride 1 when ``O ≤ 2·C``, the equal and faster
        "full" convolution: with ``dycols = im2col(dy, pad = dil·(k−1) − pad)``,
        ``dx_g = dycols_g @ rot180(W_g)`` and ``rot180(dW_g) += dycols_gᵀ @ x_g``.
        """
        n, g, _, og, p, _ = self._dims()
        if self.winograd:
            self._wg_backward(dy, x, w, dw, dx)
            return
        dy = dy.reshape(n, g, og, p)
        if self.is_1x1:
            self._backward_1x1(dy, x, w, dw, dx)
        elif dx is not None and self.full_conv:
            self._backward_full_conv(dy, x, w, dw, dx)
        else:
            self._backward_x_cols(dy, x, w, dw, dx)

    def _backward_x_cols(self, dy: Any, x: Any, w: Any, dw: Any, dx: Any) -> None:
        """``dW_g += dy_gᵀ @ cols_g`` (cols recomputed per chunk: cheaper than keeping them, see
        :meth:`reshape`) and ``dx = col2im(dy_g @ W_g)``, each if asked."""
        n, _, _, og, p, _ = self._dims()
        cl = self.channels_last
        wc = self._w_cols(w) if dx is not None else None
        if dw is not None:
            x = x.reshape(n, self.channels, *self.spatial)
        if dx is not None:
            dx = dx.reshape(n, self.channels, *self.spatial)

        def part(lane: int, lo: int, hi: int) -> Any:
            dwm = self._dw_sum(lane, lo, hi) if dw is not None else None
            for a, b in self._chunks(lo, hi):
                if dwm is not None and self.per_image:
                    self._dw_add_per_image(lane, dwm, self._x_cols(lane, x[a:b]), dy[a:b],
                                           a == lo)
                if dx is None and self.per_image:
                    continue
                dym = from_blob(dy[a:b], self._mat(lane, "out", b - a, og, p), cl)
                if dwm is not None and not self.per_image:
                    self._dw_add(lane, dwm, self._x_cols(lane, x[a:b]), dym, a == lo)
                if dx is not None:
                    self._col2im(lane, wc, dym, dx[a:b])
            return dwm

        sums = self._run(part)
        if dw is not None:
            self._dw_finish(sums, dw)

    def _dw_sum(self, lane: int, lo: int, hi: int) -> Any:
        """``lane``'s ``(G, Og, ΠK·Cg)`` sum of ``dy_g · cols_g`` over its chunks of images
        ``lo..hi``: the first chunk's product starts it (zeroed only for no images).
        NOTE: in the weights' own row order: summed as ``(G, ΠK·Cg, Og)`` it needed a transposed
        add into ``dW`` (ResNet-50 b8, the 1x1 stride-2 2048x1024 projection: dW 21.2 -> 11.8
        ms)."""
        _, g, ckg, og, _, _ = self._dims()
        dwm = self._scratch(lane, "dw", (g, og, ckg))
        if lo == hi:
            dwm[...] = 0
        return dwm

    def _accumulate(self, lane: int, acc: Any, a: Any, b: Any, first: bool) -> None:
        """``acc = a @ b`` when ``first``, else ``acc += a @ b`` through the lane's "dw_term"
        scratch. NOTE: ``acc += a @ b`` allocated a weight-sized temporary each time (fresh
        pages from the OS for large weights) and the sums were zeroed first: ResNet-50's
        14x14 and 7x7 layers, whose lanes hold all their images in one chunk, now write their
        weight gradient straight from the product."""
        if first:
            self.xp.matmul(a, b, out=acc)
            return
        term = self._scratch(lane, "dw_term", acc.shape)
        self.xp.matmul(a, b, out=term)
        acc += term

    def _dw_add(self, lane: int, dwm: Any, cols: Any, dym: Any, first: bool) -> None:
        """``dwm (+)= dy_g · cols_g`` for one chunk (both in the product layout)."""
        if self.channels_last:  # dym (G, m·P, Og), cols (G, m·P, ΠK·Cg)
            self._accumulate(lane, dwm, dym.transpose(0, 2, 1), cols, first)
        else:  # dym (G, Og, m·P), cols (G, ΠK·Cg, m·P)
            self._accumulate(lane, dwm, dym, cols.transpose(0, 2, 1), first)

    def _dw_add_per_image(self, lane: int, dwm: Any, cols: Any, dy: Any, first: bool) -> None:
        """``dwm (+)= Σ_n dy[n]_g · cols[n]_gᵀ`` for one chunk (``cols`` ``(m, G, ΠK·Cg, P)``,
        ``dy`` ``(m, G, Og, P)`` as the blob holds it), image by image."""
        for i in range(cols.shape[0]):
            self._accumulate(lane, dwm, dy[i], cols[i].transpose(0, 2, 1), first and i == 0)

    def _dw_finish(self, sums: Sequence[Any], dw: Any) -> None:
        """``dw (O, Cg, *K) += Σ_lanes dwm`` (in lane order), channels-last rows reordered."""
        _, g, ckg, og, _, _ = self._dims()
        dwm = _lane_sum(sums)
        if not self.channels_last or math.prod(self.kernel) == 1:  # rows (Cg, *K) already
            dw.reshape(g, og, ckg)[...] += dwm
            return
        # rows (*K, Cg) → (Cg, *K)
        cg = self.channels // g
        dw.reshape(g, og, cg, *self.kernel)[...] += \
            self.xp.moveaxis(dwm.reshape(g, og, *self.kernel, cg), -1, 2)

    def _backward_1x1(self, dy: Any, x: Any, w: Any, dw: Any, dx: Any) -> None:
        """1×1 kernel, stride 1, pad 0: ``dW_g += Σ_n dy[n]_g @ x[n]_gᵀ``,
        ``dx[n]_g = W_gᵀ @ dy[n]_g``."""
        n, g, ckg, og, _, s = self._dims()
        xp = self.xp
        xv = x.reshape(n, g, ckg, s) if dw is not None else None
        wt = w.reshape(g, og, ckg).transpose(0, 2, 1) if dx is not None else None
        dxv = dx.reshape(n, g, ckg, s) if dx is not None else None

        def part(lane: int, lo: int, hi: int) -> Any:
            if dxv is not None:
                xp.matmul(wt, dy[lo:hi], out=dxv[lo:hi])
            if xv is None:
                return None
            dwm = self._dw_sum(lane, lo, hi)
            if not self.on_host:  # a GPU: one product over the whole batch per group
                for j in range(g):
                    dwm[j] = xp.tensordot(dy[lo:hi, j], xv[lo:hi, j], axes=((0, 2), (0, 2)))
                return dwm
            # NOTE: on the host one GEMM per image added into the lane's sum (x is its own
            # cols): the tensordot copied both operands into (Og, N·P) temporaries (88 MiB a
            # lane for NiN's cccp1 at batch 128) and took 2.1x as long.
            self._dw_add_per_image(lane, dwm, xv[lo:hi], dy[lo:hi], True)
            return dwm

        sums = self._run(part)
        if dw is not None:
            self._dw_finish(sums, dw)

    def _col2im(self, lane: int, wc: Any, dym: Any, dx: Any) -> None:
        """``dx = col2im(dy_g @ W_g)`` for one chunk (``dym``: dy in the product layout, ``wc``:
        :meth:`_w_cols`)."""
        m, (_, g, ckg, _, p, _) = dx.shape[0], self._dims()
        cl, xp = self.channels_last, self.xp
        dcols = self._mat(lane, "cols", m, ckg, p)  # the chunk's cols are used up by now
        if cl:
            xp.matmul(dym, wc, out=dcols)  # (G, m·P, ΠK·Cg)
        else:
            xp.matmul(wc.transpose(0, 2, 1), dym, out=dcols)  # (G, Cg·ΠK, m·P)
        dxpad = self._scratch(lane, "dxpad", padded_shape((m, *dx.shape[1:]), self.pad, cl))
        shape = cols_shape(m, self.channels, self.out, self.kernel, g, cl)
        col2im(xp, dcols.reshape(shape), dx, dxpad, self.kernel, self.stride, self.pad,
               self.dilation, g, cl)

    # -- Winograd (see _winograd_tile and kernels/winograd.py) ----------------------------------
    def _wg_forward(self, x: Any, w: Any, y: Any, bias: Any) -> None:
        """``y = conv(x, W) + bias`` by F(m×m, r×r)."""
        c, o = self.channels, self.num_output
        u = self._wg.weights(w.reshape(o, c, *self.kernel), self._wgt.gg,
                             self._scratch(0, "dw", (self._wgt.gg.shape[0], c, o)))
        self._wg_conv(x.reshape(self.num, c, *self.spatial), u, y.reshape(self.num, o, *self.out),
                      self._wg_zero[:o] if bias is None else bias, self.pad)

    def _wg_backward(self, dy: Any, x: Any, w: Any, dw: Any, dx: Any) -> None:
        """``dW += ∂E/∂W`` (``dw`` given) and ``dx`` (given, overwritten) by F(m×m, r×r): ``dx``
        is the convolution of ``dy`` padded by ``r − 1 − pad`` with the flipped, transposed
        kernels."""
        c, o, r = self.channels, self.num_output, self.kernel[0]
        if dx is not None:
            u = self._wg.weights(w.reshape(o, c, r, r), self._wgt.gg,
                                 self._scratch(0, "dw", (self._wgt.gg.shape[0], o, c)), flip=True)
            self._wg_conv(dy.reshape(self.num, o, *self.out), u,
                          dx.reshape(self.num, c, *self.spatial), self._wg_zero[:c],
                          tuple(r - 1 - p for p in self.pad))
        if dw is not None:
            self._wg_weight_grad(dy, x, dw)

    def _wg_tiles(self, out: Sequence[int], cin: int, cout: int) -> tuple[int, int, int]:
        """``(th, tw, images a chunk)`` for an output ``out`` (the transformed tiles of a chunk's
        input and products fit in ``CHUNK_BYTES``, as im2col's cols do)."""
        m, alpha2 = self.winograd, self._wgt.gg.shape[0]
        th, tw = -(-out[0] // m), -(-out[1] // m)
        per_image = alpha2 * th * tw * (cin + cout) * self.dtype.itemsize
        return th, tw, max(1, CHUNK_BYTES // per_image)

    def _wg_in(self, lane: int, name: str, x: Any, b: Any, pad: int, th: int, tw: int) -> Any:
        """``tiles_in`` of ``x`` ``(m, C, H, W)`` with ``b`` into ``lane``'s ``name``:
        ``(α², m·th·tw, C)``."""
        alpha, s = b.shape
        m = self.winograd
        v = self._scratch(lane, name, (alpha * alpha, x.shape[0] * th * tw, x.shape[1]))
        band = self._scratch(lane, "wg_band", (s, tw * m + s - m, x.shape[1]))
        tmp = self._scratch(lane, "wg_tmp", (alpha, s, x.shape[1]))
        self._wg.tiles_in(x, pad, m, th, tw, b, v, band, tmp)
        return v

    def _wg_conv(self, x: Any, u: Any, y: Any, bias: Any, pad: Sequence[int]) -> None:
        """``y (N, O, Ho, Wo) = conv(x (N, C, H, W)) + bias`` for ``U`` ``(α², C, O)``."""
        (cin, cout), m, alpha = u.shape[1:], self.winograd, self._wgt.at.shape[1]
        th, tw, chunk = self._wg_tiles(y.shape[2:], cin, cout)

        def part(lane: int, lo: int, hi: int) -> None:
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                v = self._wg_in(lane, "cols", x[a:b], self._wgt.bt, pad[0], th, tw)
                mt = self._scratch(lane, "out", (alpha * alpha, v.shape[1], cout))
                self.xp.matmul(v, u, out=mt)
                self._wg.tiles_out(mt, self._wgt.at, y[a:b], bias, th, tw,
                                   self._scratch(lane, "wg_band", (m, tw * m, cout)),
                                   self._scratch(lane, "wg_tmp", (m, alpha, cout)))

        self._run(part)

    def _wg_weight_grad(self, dy: Any, x: Any, dw: Any) -> None:
        """``dW += Gᵀ (Σ_t V_tᵀ D_t) G`` (see kernels/winograd.py), summed per lane."""
        c, o = self.channels, self.num_output
        x = x.reshape(self.num, c, *self.spatial)
        dy = dy.reshape(self.num, o, *self.out)
        th, tw, chunk = self._wg_tiles(self.out, c, o)

        def part(lane: int, lo: int, hi: int) -> Any:
            du = self._scratch(lane, "dw", (self._wgt.gg.shape[0], c, o))
            if lo == hi:
                du[...] = 0
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                v = self._wg_in(lane, "cols", x[a:b], self._wgt.bt, self.pad[0], th, tw)
                d = self._wg_in(lane, "dy", dy[a:b], self._wgt.a, 0, th, tw)
                self._accumulate(lane, du, v.transpose(0, 2, 1), d, a == lo)
            return du

        self._wg.add_weight_grad(_lane_sum(self._run(part)), self._wgt.gg,
                                 dw.reshape(o, c, *self.kernel))

    def _backward_full_conv(self, dy: Any, x: Any, w: Any, dw: Any, dx: Any) -> None:
        """Stride 1: dx is the "full" convolution of dy with the flipped kernel, and the weight
        gradient a product with the same cols of dy, so x needs no im2col:

        ``dycols = im2col(dy, pad = dil·(k−1) − pad)``, ``dx_g = dycols_g @ rot180(W_g)``,
        ``rot180(dW_g) += dycols_gᵀ @ x_g`` (per chunk; ``x_g`` as an ``(m·ΠS, Cg)`` matrix).
        """
        n, g, _, og, _, s = self._dims()
        xp, cl, cg, nsp = self.xp, self.channels_last, self.channels // g, len(self.kernel)
        q = tuple(d * (k - 1) - p for k, d, p in zip(self.kernel, self.dilation, self.pad))
        wr = self._w_cols(w, flip=True)  # (G, Og·ΠK, Cg), rows ordered like dycols'
        if dw is not None:
            x = x.reshape(n, g, cg, s)
        dx = dx.reshape(n, g, cg, s)
        dy = dy.reshape(n, self.num_output, *self.out)

        def part(lane: int, lo: int, hi: int) -> Any:
            dwr = None
            if dw is not None:  # Σ over the lane's chunks of dycols_gᵀ @ x_g
                dwr = self._scratch(lane, "dwr", wr.shape)
                if lo == hi:
                    dwr[...] = 0
            for a, b in self._chunks(lo, hi):
                m = b - a
                cols = self._cols(lane, dy[a:b], self.num_output, self.out, self.spatial, q,
                                  (1,) * nsp, "dycols")
                out = self._mat(lane, "out", m, cg, s)
                if dwr is not None:
                    xm = from_blob(x[a:b], self._mat(lane, "dy", m, cg, s), cl)
                    # cols (G, m·S, ΠK·Og) and xm (G, m·S, Cg), or both transposed
                    if cl:
                        self._accumulate(lane, dwr, cols.transpose(0, 2, 1), xm, a == lo)
                    else:
                        self._accumulate(lane, dwr, cols, xm.transpose(0, 2, 1), a == lo)
                if cl:
                    xp.matmul(cols, wr, out=out)
                else:
                    xp.matmul(wr.transpose(0, 2, 1), cols, out=out)
                to_blob(xp, out, dx[a:b], None, cl)
            return dwr

        sums = self._run(part)
        if dw is None:
            return
        dwr = _lane_sum(sums)
        # rows of dwr: (*K, Og) channels-last, (Og, *K) channels-first, kernels flipped
        flip = (Ellipsis, *[slice(None, None, -1)] * nsp)
        if cl:
            dwr = dwr.reshape(g, *self.kernel, og, cg)[(*flip, slice(None), slice(None))]
        else:
            dwr = dwr.reshape(g, og, *self.kernel, cg)[(*flip, slice(None))]
        dw.reshape(g, og, cg, *self.kernel)[...] += \
            xp.moveaxis(dwr, (-2, -1), (1, 2)) if cl else xp.moveaxis(dwr, -1, 2)


def _lane_sum(sums: Sequence[Any]) -> Any:
    """The lanes' partial sums added in lane order (into the first)."""
    total = sums[0]
    for other in sums[1:]:
        total += other
    return total
