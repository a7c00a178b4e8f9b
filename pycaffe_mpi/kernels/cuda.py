"""CUDA kernels for the passes where generic ``xp`` code is slow on a GPU.

Each kernel is CUDA C source (a string below) compiled once per element type through
:func:`pycaffe_mpi.backend.cuda_kernel` (which owns CuPy); the functions here compute the launch
arguments and call it. They take device arrays (C-contiguous, float32 or float64) and are used
only where :func:`enabled` says so: the array module is CuPy. Every kernel is a grid-stride loop
(``KERNEL_LOOP``, from the backend's prelude) over independent outputs, written as gathers, so
no atomics and no ordering: results do not depend on the launch shape, and the same source runs
as plain C++ in one host thread (the kernel tests' stand-in for a GPU).

Layouts follow the NumPy kernels they replace: im2col's channels-first ``cols``
``(C, KH, KW, N, OH, OW)`` (:mod:`pycaffe_mpi.kernels.im2col`); pooling on ``(N·C, H, W)``
planes with Caffe's argmax mask (flat ``h·W + w``); LRN across channels on ``(N, C, H·W)``.

NOTE: no cuDNN path: CuPy 14 removed its cuDNN bindings (cupy.cudnn, cupyx.cudnn), so
convolutions are these im2col/col2im kernels plus cuBLAS products (CuPy's matmul) on every
CuPy version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod

BLOCK = 256
MAX_BLOCKS = 1 << 20  # the grid-stride loop covers the rest


def enabled(xp: Any) -> bool:
    """True when ``xp`` is CuPy, i.e. layers should use these kernels."""
    return backend_mod.is_cupy(xp)


def launch(source: str, name: str, dtype: Any, total: int, args: Sequence[Any]) -> None:
    """Run kernel ``name`` of ``source`` over ``total`` outputs."""
    if total <= 0:
        return
    blocks = max(1, min(-(-total // BLOCK), MAX_BLOCKS))
    backend_mod.cuda_kernel(source, name, dtype)((blocks,), (BLOCK,), tuple(args))


def _ints(*values: int) -> list[Any]:
    return [np.int32(v) for v in values]


# -- im2col / col2im (channels-first, 2-D) --------------------------------------------------------

IM2COL = r"""
extern "C" __global__ void im2col_cf(const T* x, T* cols, long long total, int N, int C, int H,
    int W, int KH, int KW, int OH, int OW, int SH, int SW, int PH, int PW, int DH, int DW) {
  KERNEL_LOOP(i, total) {
    long long r = i;
    int ow = r % OW; r /= OW;
    int oh = r % OH; r /= OH;
    int n = r % N; r /= N;
    int kw = r % KW; r /= KW;
    int kh = r % KH;
    int c = r / KH;
    int h = oh * SH - PH + kh * DH, w = ow * SW - PW + kw * DW;
    cols[i] = (h >= 0 && h < H && w >= 0 && w < W)
        ? x[(((long long)n * C + c) * H + h) * W + w] : (T)0;
  }
}

extern "C" __global__ void col2im_cf(const T* cols, T* dx, long long total, int N, int C, int H,
    int W, int KH, int KW, int OH, int OW, int SH, int SW, int PH, int PW, int DH, int DW) {
  KERNEL_LOOP(i, total) {
    long long r = i;
    int w = r % W; r /= W;
    int h = r % H; r /= H;
    int c = r % C;
    int n = r / C;
    T acc = 0;
    for (int kh = 0; kh < KH; ++kh) {
      int th = h + PH - kh * DH;
      if (th < 0 || th % SH != 0 || th / SH >= OH) continue;
      for (int kw = 0; kw < KW; ++kw) {
        int tw = w + PW - kw * DW;
        if (tw < 0 || tw % SW != 0 || tw / SW >= OW) continue;
        acc += cols[((((long long)c * KH + kh) * KW + kw) * N + n) * OH * OW
                    + (long long)(th / SH) * OW + tw / SW];
      }
    }
    dx[i] = acc;
  }
}
"""


def _conv_args(x_shape: Sequence[int], out: Sequence[int], kernel: Sequence[int],
               stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int]) -> list[Any]:
    n, c, h, w = x_shape
    return _ints(n, c, h, w, *kernel, *out, *stride, *pad, *dilation)


def conv_applies(xp: Any, kernel: Sequence[int], channels_last: bool) -> bool:
    """Whether the im2col/col2im kernels serve this convolution (2-D, channels-first)."""
    return enabled(xp) and len(kernel) == 2 and not channels_last


class Im2col:
    """im2col of inputs of one shape straight into ``cols`` ``(C, KH, KW, N, OH, OW)`` (no padded
    copy of the input: out-of-image cells read 0)."""

    def __init__(self, cols: Any, x_shape: Sequence[int], kernel: Sequence[int],
                 stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int]) -> None:
        out = cols.shape[-2:]
        self.cols = cols
        self.args = _conv_args(x_shape, out, kernel, stride, pad, dilation)

    def __call__(self, x: Any) -> Any:
        x = x if x.flags.c_contiguous else x.copy()
        launch(IM2COL, "im2col_cf", x.dtype, self.cols.size,
               [x, self.cols, np.int64(self.cols.size), *self.args])
        return self.cols


def im2col_plan(xp: Any, cols: Any, x_shape: Sequence[int], kernel: Sequence[int],
                stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int],
                channels_last: bool) -> Im2col | None:
    """An :class:`Im2col` when the kernel serves this geometry and ``cols`` is contiguous,
    else None (the caller keeps its generic path)."""
    if not conv_applies(xp, kernel, channels_last) or not cols.flags.c_contiguous:
        return None
    return Im2col(cols, x_shape, kernel, stride, pad, dilation)


def col2im(xp: Any, cols: Any, dx: Any, kernel: Sequence[int], stride: Sequence[int],
           pad: Sequence[int], dilation: Sequence[int], channels_last: bool) -> bool:
    """``dx`` (overwritten) = im2col's adjoint of ``cols``; False (nothing done) when the kernel
    does not serve this geometry."""
    if (not conv_applies(xp, kernel, channels_last) or not cols.flags.c_contiguous
            or not dx.flags.c_contiguous):
        return False
    out = cols.shape[-2:]
    launch(IM2COL, "col2im_cf", dx.dtype, dx.size,
           [cols, dx, np.int64(dx.size), *_conv_args(dx.shape, out, kernel, stride, pad,
                                                     dilation)])
    return True


# -- pooling ---------------------------------------------------------------------------------------

POOL = r"""
extern "C" __global__ void max_pool_fwd(const T* x, T* y, int* mask, long long total, int H,
    int W, int OH, int OW, int KH, int KW, int SH, int SW, int PH, int PW) {
  KERNEL_LOOP(i, total) {
    int ow = i % OW, oh = (i / OW) % OH;
    long long plane = i / ((long long)OW * OH);
    int hs = oh * SH - PH, ws = ow * SW - PW;
    int he = hs + KH < H ? hs + KH : H, we = ws + KW < W ? ws + KW : W;
    hs = hs > 0 ? hs : 0;
    ws = ws > 0 ? ws : 0;
    const T* xs = x + plane * H * W;
    T best = -INFINITY;
    int arg = -1;
    for (int h = hs; h < he; ++h)
      for (int w = ws; w < we; ++w)
        if (xs[h * W + w] > best || arg < 0) { best = xs[h * W + w]; arg = h * W + w; }
    y[i] = best;
    mask[i] = arg;
  }
}

extern "C" __global__ void max_pool_bwd(const T* dy, const int* mask, T* dx, long long total,
    int H, int W, int OH, int OW, int KH, int KW, int SH, int SW, int PH, int PW) {
  KERNEL_LOOP(i, total) {
    int w = i % W, h = (i / W) % H;
    long long plane = i / ((long long)W * H);
    int phs = (h + PH < KH) ? 0 : (h + PH - KH) / SH + 1;
    int phe = (h + PH) / SH + 1 < OH ? (h + PH) / SH + 1 : OH;
    int pws = (w + PW < KW) ? 0 : (w + PW - KW) / SW + 1;
    int pwe = (w + PW) / SW + 1 < OW ? (w + PW) / SW + 1 : OW;
    const T* d = dy + plane * OH * OW;
    const int* m = mask + plane * OH * OW;
    T acc = 0;
    for (int oh = phs; oh < phe; ++oh)
      for (int ow = pws; ow < pwe; ++ow)
        if (m[oh * OW + ow] == h * W + w) acc += d[oh * OW + ow];
    dx[i] = acc;
  }
}

extern "C" __global__ void ave_pool_fwd(const T* x, const T* inv_area, T* y, long long total,
    int H, int W, int OH, int OW, int KH, int KW, int SH, int SW, int PH, int PW) {
  KERNEL_LOOP(i, total) {
    int ow = i % OW, oh = (i / OW) % OH;
    long long plane = i / ((long long)OW * OH);
    int hs = oh * SH - PH, ws = ow * SW - PW;
    int he = hs + KH < H ? hs + KH : H, we = ws + KW < W ? ws + KW : W;
    hs = hs > 0 ? hs : 0;
    ws = ws > 0 ? ws : 0;
    const T* xs = x + plane * H * W;
    T acc = 0;
    for (int h = hs; h < he; ++h)
      for (int w = ws; w < we; ++w) acc += xs[h * W + w];
    y[i] = acc * inv_area[oh * OW + ow];
  }
}

extern "C" __global__ void ave_pool_bwd(const T* dy, const T* inv_area, T* dx, long long total,
    int H, int W, int OH, int OW, int KH, int KW, int SH, int SW, int PH, int PW) {
  KERNEL_LOOP(i, total) {
    int w = i % W, h = (i / W) % H;
    long long plane = i / ((long long)W * H);
    int phs = (h + PH < KH) ? 0 : (h + PH - KH) / SH + 1;
    int phe = (h + PH) / SH + 1 < OH ? (h + PH) / SH + 1 : OH;
    int pws = (w + PW < KW) ? 0 : (w + PW - KW) / SW + 1;
    int pwe = (w + PW) / SW + 1 < OW ? (w + PW) / SW + 1 : OW;
    const T* d = dy + plane * OH * OW;
    T acc = 0;
    for (int oh = phs; oh < phe; ++oh)
      for (int ow = pws; ow < pwe; ++ow) acc += d[oh * OW + ow] * inv_area[oh * OW + ow];
    dx[i] = acc;
  }
}
"""


def _pool_args(g: Any) -> list[Any]:
    """``H, W, OH, OW, KH, KW, SH, SW, PH, PW`` of a :class:`pycaffe_mpi.kernels.pooling.Phases`."""
    return _ints(*g.size, *g.out, *g.kernel, *g.stride, *g.pad)


def _mask(g: Any, bufs: Any) -> Any:
    return bufs.get("cuda_mask", (g.planes, *g.out), dtype=np.int32)


def max_pool_forward(x: Any, top: Any, g: Any, bufs: Any) -> None:
    """``top`` = window maxima of ``x`` ``(N, C, H, W)``; the argmax mask (flat ``h·W + w``, the
    first maximum in row-major order) stays in ``bufs`` for :func:`max_pool_backward`."""
    launch(POOL, "max_pool_fwd", x.dtype, top.size,
           [x, top, _mask(g, bufs), np.int64(top.size), *_pool_args(g)])


def max_pool_backward(dy: Any, dx: Any, g: Any, bufs: Any) -> None:
    """``dx`` (overwritten) = ``dy`` routed to the argmax of each window."""
    launch(POOL, "max_pool_bwd", dx.dtype, dx.size,
           [dy, _mask(g, bufs), dx, np.int64(dx.size), *_pool_args(g)])


def max_pool_argk(xp: Any, g: Any, bufs: Any) -> Any:
    """Offset ``i·KW + j`` of each window's maximum, ``(planes, OH, OW)`` int64 (as
    :func:`pycaffe_mpi.kernels.pooling.max_argk`)."""
    mask = _mask(g, bufs).astype(np.int64)
    w = g.size[1]
    rows = (xp.arange(g.out[0]) * g.stride[0] - g.pad[0])[:, None]
    cols = (xp.arange(g.out[1]) * g.stride[1] - g.pad[1])[None, :]
    return (mask // w - rows) * g.kernel[1] + (mask % w - cols)


def ave_pool_forward(x: Any, top: Any, inv_area: Any, g: Any) -> None:
    """``top`` = window sums of ``x`` (clipped to the image) times ``inv_area`` ``(OH, OW)``."""
    launch(POOL, "ave_pool_fwd", x.dtype, top.size,
           [x, inv_area, top, np.int64(top.size), *_pool_args(g)])


def ave_pool_backward(dy: Any, dx: Any, inv_area: Any, g: Any) -> None:
    """``dx`` (overwritten) = Σ over the windows holding a cell of ``dy · inv_area``."""
    launch(POOL, "ave_pool_bwd", dx.dtype, dx.size,
           [dy, inv_area, dx, np.int64(dx.size), *_pool_args(g)])


# -- LRN across channels ---------------------------------------------------------------------------

LRN = r"""
extern "C" __global__ void lrn_fwd(const T* x, T* scale, T* y, long long total, int C, int HW,
    int size, T coef, T k, T beta) {
  KERNEL_LOOP(i, total) {
    long long base = (i / HW) * C * HW + i % HW;
    int half = (size - 1) / 2;
    for (int c = 0; c < C; ++c) {
      T acc = 0;
      int lo = c - half > 0 ? c - half : 0, hi = c + half < C - 1 ? c + half : C - 1;
      for (int q = lo; q <= hi; ++q) {
        T v = x[base + (long long)q * HW];
        acc += v * v;
      }
      T s = k + coef * acc;
      scale[base + (long long)c * HW] = s;
      y[base + (long long)c * HW] = x[base + (long long)c * HW] * pow(s, -beta);
    }
  }
}

extern "C" __global__ void lrn_bwd(const T* x, const T* y, const T* scale, const T* dy, T* dx,
    long long total, int C, int HW, int size, T coef, T beta) {
  KERNEL_LOOP(i, total) {
    long long base = (i / HW) * C * HW + i % HW;
    int half = (size - 1) / 2;
    for (int c = 0; c < C; ++c) {
      T acc = 0;
      int lo = c - half > 0 ? c - half : 0, hi = c + half < C - 1 ? c + half : C - 1;
      for (int q = lo; q <= hi; ++q) {
        long long j = base + (long long)q * HW;
        acc += dy[j] * y[j] / scale[j];
      }
      long long j = base + (long long)c * HW;
      dx[j] = dy[j] * pow(scale[j], -beta) - (T)2 * beta * coef * x[j] * acc;
    }
  }
}
"""


def lrn_forward(x: Any, scale: Any, y: Any, size: int, coef: float, k: float,
                beta: float) -> None:
    """Across channels: ``scale = k + coef·Σ_window x²`` (kept for backward), ``y = x·scale^−β``."""
    n, c, h, w = x.shape
    t = x.dtype.type
    launch(LRN, "lrn_fwd", x.dtype, n * h * w,
           [x, scale, y, np.int64(n * h * w), *_ints(c, h * w, size), t(coef), t(k), t(beta)])


def lrn_backward(x: Any, y: Any, scale: Any, dy: Any, dx: Any, size: int, coef: float,
                 beta: float) -> None:
    """``dx = dy·scale^−β − 2β·coef·x·Σ_window(dy·y/scale)`` (overwritten)."""
    n, c, h, w = x.shape
    t = x.dtype.type
    launch(LRN, "lrn_bwd", x.dtype, n * h * w,
           [x, y, scale, dy, dx, np.int64(n * h * w), *_ints(c, h * w, size), t(coef), t(beta)])


# -- softmax loss ----------------------------------------------------------------------------------

SOFTMAX_LOSS = r"""
extern "C" __global__ void softmax_loss_fwd(const T* x, const T* label, T* prob, T* loss,
    T* valid, long long total, int C, int inner, int has_ignore, int ignore_label,
    T log_min) {
  KERNEL_LOOP(p, total) {
    long long base = (p / inner) * C * inner + p % inner;
    T mx = x[base];
    for (int c = 1; c < C; ++c) mx = x[base + (long long)c * inner] > mx
        ? x[base + (long long)c * inner] : mx;
    T sum = 0;
    for (int c = 0; c < C; ++c) sum += exp(x[base + (long long)c * inner] - mx);
    T lse = mx + log(sum);
    for (int c = 0; c < C; ++c)
      prob[base + (long long)c * inner] = exp(x[base + (long long)c * inner] - lse);
    int y = (int)label[p];
    if (has_ignore && y == ignore_label) { loss[p] = 0; valid[p] = 0; continue; }
    valid[p] = 1;
    if (y < 0 || y >= C) { loss[p] = NAN; continue; }  // a bad label poisons the loss
    T lp = x[base + (long long)y * inner] - lse;
    loss[p] = -(lp > log_min ? lp : log_min);
  }
}

extern "C" __global__ void softmax_loss_bwd(const T* prob, const T* label, const T* valid,
    const T* scale, T* dx, long long total, int C, int inner) {
  KERNEL_LOOP(i, total) {
    int c = (i / inner) % C;
    long long p = (i / ((long long)inner * C)) * inner + i % inner;
    T g = prob[i] - (T)((int)label[p] == c);
    dx[i] = g * valid[p] * scale[0];
  }
}
"""


def softmax_loss_forward(x3: Any, label: Any, prob: Any, loss: Any, valid: Any,
                         ignore_label: int | None, log_min: float) -> None:
    """Per position ``p`` of ``x3`` ``(outer, C, inner)``: ``prob`` = softmax over C,
    ``loss[p] = −max(log prob[y_p], log_min)`` (0 where ignored, NaN for a label outside
    ``[0, C)``), ``valid[p]`` 1 or 0; ``label``, ``loss``, ``valid``: ``outer·inner`` values."""
    outer, c, inner = x3.shape
    t = x3.dtype.type
    launch(SOFTMAX_LOSS, "softmax_loss_fwd", x3.dtype, outer * inner,
           [x3, label, prob, loss, valid, np.int64(outer * inner),
            *_ints(c, inner, ignore_label is not None, ignore_label or 0), t(log_min)])


def softmax_loss_backward(prob: Any, label: Any, valid: Any, scale: Any, dx: Any) -> None:
    """``dx = (prob − onehot(label)) · valid · scale`` (``scale``: a 1-element device array)."""
    _, c, inner = prob.shape
    launch(SOFTMAX_LOSS, "softmax_loss_bwd", prob.dtype, prob.size,
           [prob, label, valid, scale, dx, np.int64(prob.size), *_ints(c, inner)])


# -- multiple-choice learning ----------------------------------------------------------------------

MCL = r"""
extern "C" __global__ void mcl_assign(const T* loss, const long long* key, const bool* valid,
    bool* alpha, long long total, int M, int K) {
  KERNEL_LOOP(n, total) {
    const T* l = loss + n * M;
    const long long* kk = key + n * M;
    for (int m = 0; m < M; ++m) {
      int rank = 0;
      for (int q = 0; q < M; ++q)
        rank += (l[q] < l[m]) || (l[q] == l[m] && kk[q] < kk[m]);
      alpha[n * M + m] = valid[n] && rank < K;
    }
  }
}
"""


def mcl_assign(xp: Any, member_loss: Any, key: Any, valid: Any, k: int) -> Any:
    """α ``(N, M)`` bool: example n goes to the k members with the smallest loss, ``key`` (an
    ``(N, M)`` int64 permutation) ranking equal losses; nobody for an invalid example."""
    n, m = member_loss.shape
    loss = xp.ascontiguousarray(member_loss)
    alpha = xp.empty((n, m), dtype=bool)
    launch(MCL, "mcl_assign", loss.dtype, n,
           [loss, xp.ascontiguousarray(key, dtype=np.int64), xp.ascontiguousarray(valid),
            alpha, np.int64(n), *_ints(m, k)])
    return alpha
