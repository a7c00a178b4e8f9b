"""Winograd's minimal filtering for stride-1 2-D convolutions on the host: F(m×m, r×r).

Notation: a tile of ``m×m`` outputs needs ``α×α`` inputs, ``α = m + r − 1``; the tiles of an
``(Ho, Wo)`` output are ``th×tw`` (``th = ⌈Ho/m⌉``, ``tw = ⌈Wo/m⌉``), tile ``t = (n·th + ty)·tw +
tx`` covering outputs ``(ty·m + i, tx·m + j)``, inputs ``(ty·m − pad + k, tx·m − pad + l)``.
With the transform matrices ``Bᵀ (α, α)``, ``G (α, r)`` and ``Aᵀ (m, α)`` (:func:`matrices`), one
output tile of the correlation ``y[o] = Σ_c x[c] ⋆ W[o, c]`` is::

    Y = Aᵀ [ Σ_c (G W[o, c] Gᵀ) ⊙ (Bᵀ d[c] B) ] A

so per position ``p = (k, l)`` of the ``α×α`` grid the sum over channels is one GEMM over all
tiles at once: ``M[p] (T, O) = V[p] (T, C) @ U[p] (C, O)`` with ``V[p, t, c] = (Bᵀ d B)[k, l]``
and ``U[p, c, o] = (G W Gᵀ)[k, l]``: ``α²·C·O`` multiplies per tile where im2col needs
``m²·r²·C·O`` (F(4×4, 3×3): 4x fewer; F(2×2, 3×3) 2.25x; F(4×4, 5×5) 6.25x).

Gradients, from ``dy = ∂E/∂y``:

* ``dx`` is the same algorithm run on ``dy`` padded by ``r − 1 − pad`` with the kernels flipped
  and in and out channels swapped (``W'[c, o] = rot180(W[o, c])``).
* ``dU[p] = V[p]ᵀ @ D[p]`` (C, O) with ``D[p, t, o] = (A dY Aᵀ)[k, l]`` (``dY`` the ``m×m`` tile of
  ``dy``, zero past the edge), then ``dW[o, c] = Gᵀ dU[:, c, o] G``.

The transforms (:func:`tiles_in`, :func:`tiles_out`) are numba loops that copy a band of tile
rows channels-last into the cache and run each transform step as a loop over channels (which
the compiler vectorises). Matrices come from Cook-Toom points ``0, ±1, ±2, ±1/2, ∞`` (Lavin &
Gray's for F(2×2, 3×3) and F(4×4, 3×3)), computed exactly with fractions.

NOTE: float32 results differ from the direct product by rounding of the transforms: relative to
the output's largest value ~5e-7 for F(2×2, 3×3), ~1e-5 for F(4×4, 3×3) and ~4e-6 for
F(4×4, 5×5) (random data, 64-512 channels); in float64 ~1e-15.
NOTE: ``cache=True`` keeps the compiled code on disk; this module (and numba) is imported on
first use by :class:`pycaffe_mpi.kernels.conv_plan.ConvPlan`.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any, NamedTuple

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)

# Cook-Toom interpolation points, in the order they are taken (α − 1 of them, plus ∞)
_POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2), 3, -3)


def _poly(roots: list[Fraction]) -> list[Fraction]:
    """Coefficients (constant term first) of ``Π (x − root)``."""
    coef = [Fraction(1)]
    for root in roots:
        coef = [Fraction(0), *coef]
        for i in range(len(coef) - 1):
            coef[i] -= root * coef[i + 1]
    return coef


@functools.cache
def matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Aᵀ (m, α), G (α, r), Bᵀ (α, α))`` of F(m, r) for correlation, float64 (exact values
    rounded once): ``y = Aᵀ[(G g) ⊙ (Bᵀ d)]`` is ``y_i = Σ_j d_{i+j} g_j``."""
    alpha = m + r - 1
    if not 2 <= alpha <= len(_POINTS) + 1:
        raise ValueError(f"no Winograd points for F({m}, {r})")
    a = [Fraction(p) for p in _POINTS[:alpha - 1]]
    n = alpha - 1
    at = [[a[k] ** i for k in range(n)] + [Fraction(int(i == m - 1))] for i in range(m)]
    scale = [np.prod([a[k] - a[j] for j in range(n) if j != k]) for k in range(n)]
    g = [[a[k] ** j / scale[k] for j in range(r)] for k in range(n)]
    g.append([Fraction(int(j == r - 1)) for j in range(r)])
    bt = [[*_poly([a[j] for j in range(n) if j != k]), Fraction(0)] for k in range(n)]
    bt.append(_poly(a))
    return tuple(np.array([[float(v) for v in row] for row in mat])  # type: ignore[return-value]
                 for mat in (at, g, bt))


def tile_size(out: tuple[int, ...]) -> int:
    """``m`` for an output ``out``: 4, or 0 (no Winograd) where an output side is under 8.
    NOTE: ResNet-50 b8's 7x7 3x3 layers (512 channels, 2 cores) took 1.39x im2col's time with
    F(2×2, 3×3) (a scratch measurement, forward and the two gradients called one by one): the
    weights' transforms (``α²/r²`` times the weights, three of them a step) outweigh products
    of 64 rows a lane."""
    return 4 if min(out) >= 8 else 0


class Transforms(NamedTuple):
    """F(m, r)'s matrices in one dtype, as the kernels take them: ``at`` ``Aᵀ (m, α)``, ``bt``
    ``Bᵀ (α, α)``, ``a`` ``A (α, m)`` (the weight gradient's transform of dy) and ``gg``
    ``G ⊗ G (α², r²)``: ``U[(k, l)] = Σ_(a, b) (G⊗G)[(k, l), (a, b)] W[a, b]``."""

    at: np.ndarray
    bt: np.ndarray
    a: np.ndarray
    gg: np.ndarray


@functools.cache
def transforms(m: int, r: int, dtype: str) -> Transforms:
    """:class:`Transforms` of F(m, r) in ``dtype`` (a NumPy dtype string), made once."""
    at, g, bt = matrices(m, r)
    return Transforms(at.astype(dtype), bt.astype(dtype), np.ascontiguousarray(at.T, dtype),
                      np.kron(g, g).astype(dtype))


def weights(w: Any, gg: np.ndarray, u: Any, flip: bool = False) -> Any:
    """``U (α², C, O)`` of ``w (O, C, r, r)`` into ``u``; ``flip``: of ``W'`` (``(α², O, C)``,
    the kernels rotated 180° and the channel axes swapped: the input gradient's weights)."""
    r = w.shape[-1]
    wk = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1) if flip else w.transpose(2, 3, 1, 0)
    np.matmul(gg, np.ascontiguousarray(wk).reshape(r * r, -1), out=u.reshape(gg.shape[0], -1))
    return u


def add_weight_grad(du: Any, gg: np.ndarray, dw: Any) -> None:
    """``dW (O, C, r, r) += Gᵀ dU G`` for ``du (α², C, O)``."""
    o, c, r, _ = dw.shape
    dwk = gg.T @ du.reshape(gg.shape[0], -1)  # (r², C·O)
    dw += dwk.reshape(r, r, c, o).transpose(3, 2, 0, 1)


@_jit
def tiles_in(x: Any, pad: int, m: int, th: int, tw: int, b: Any, v: Any, band: Any,
             tmp: Any) -> None:
    """``v[(k, l), t, c] = (B d_t[c] Bᵀ)[k, l]`` for ``b (α, s)`` and the ``s×s`` windows
    ``d_t`` of ``x (n, C, H, W)`` at rows ``ty·m − pad``, columns ``tx·m − pad`` (zero outside).

    ``b = Bᵀ`` (``s = α``) gives the input transform, ``b = A`` (``s = m``, pad 0) the
    weight gradient's transform of ``dy``. Scratch: ``band (s, tw·m + s − m, C)`` (a band of
    rows, channels-last), ``tmp (α, s, C)``.
    """
    n_img, chans, height, width = x.shape
    alpha, s = b.shape
    wp = band.shape[1]
    for n in range(n_img):
        for ty in range(th):
            y0 = ty * m - pad
            for k in range(s):
                yy = y0 + k
                if yy < 0 or yy >= height:
                    band[k, :, :] = 0
                    continue
                for xx in range(wp):
                    xi = xx - pad
                    if xi < 0 or xi >= width:
                        band[k, xx, :] = 0
                for c in range(chans):
                    for xi in range(min(width, wp - pad)):
                        band[k, xi + pad, c] = x[n, c, yy, xi]
            for tx in range(tw):
                t = (n * th + ty) * tw + tx
                x0 = tx * m
                for i in range(alpha):  # tmp[i, l] = Σ_k b[i, k] d[k, l]
                    for li in range(s):
                        for c in range(chans):
                            tmp[i, li, c] = 0
                        for k in range(s):
                            coef = b[i, k]
                            if coef != 0:
                                for c in range(chans):
                                    tmp[i, li, c] += coef * band[k, x0 + li, c]
                for i in range(alpha):  # v[(i, j)] = Σ_l tmp[i, l] b[j, l]
                    for j in range(alpha):
                        p = i * alpha + j
                        for c in range(chans):
                            v[p, t, c] = 0
                        for li in range(s):
                            coef = b[j, li]
                            if coef != 0:
                                for c in range(chans):
                                    v[p, t, c] += coef * tmp[i, li, c]


@_jit
def tiles_out(mt: Any, at: Any, y: Any, bias: Any, th: int, tw: int, band: Any,
              tmp: Any) -> None:
    """``y[n, o, ty·m + i, tx·m + j] = (Aᵀ M_t[o] A)[i, j] + bias[o]`` for the products
    ``mt[(k, l), t, o]`` (outputs past ``y``'s edge dropped); ``bias (O,)`` (zeros for none).
    Scratch: ``band (m, tw·m, O)``, ``tmp (m, α, O)``."""
    n_img, outs, height, width = y.shape
    m, alpha = at.shape
    for n in range(n_img):
        for ty in range(th):
            for tx in range(tw):
                t = (n * th + ty) * tw + tx
                for i in range(m):  # tmp[i, l] = Σ_k at[i, k] M[k, l]
                    for li in range(alpha):
                        for o in range(outs):
                            tmp[i, li, o] = 0
                        for k in range(alpha):
                            coef = at[i, k]
                            if coef != 0:
                                for o in range(outs):
                                    tmp[i, li, o] += coef * mt[k * alpha + li, t, o]
                for i in range(m):  # Y[i, j] = Σ_l tmp[i, l] at[j, l]
                    for j in range(m):
                        xx = tx * m + j
                        for o in range(outs):
                            band[i, xx, o] = bias[o]
                        for li in range(alpha):
                            coef = at[j, li]
                            if coef != 0:
                                for o in range(outs):
                                    band[i, xx, o] += coef * tmp[i, li, o]
            for i in range(min(m, height - ty * m)):
                for o in range(outs):
                    for xx in range(width):
                        y[n, o, ty * m + i, xx] = band[i, xx, o]
