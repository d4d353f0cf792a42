"""FFT-layout convolution with the transforms written as matrix products, channels last.

The `fft` path runs TensorFlow's / JAX's FFT over the two innermost axes, so channels-last activations are
transposed to (batch, C, H, W) and back, and the per-bin product needs its own bins-major transposes.
This path computes the same circular correlation (same `FFTLayout`, same transform size, the SAME pad
folded into the kernel spectrum the same way) with dense DFT matrices applied by batched matrix products
over the spatial axes, so the activations stay channels last and every step is a GEMM:

  x (B, H, W, C)
    W: (2F x W) @ (B*H, W, C)                    real DFT, rows (re/im, f); only the H*W real inputs
                                                 (the zero padding to Q is folded in: no padded copy)
    H: (2P x 2H) @ (B, 2H, F*C)                  complex DFT along H; rows (p, re/im), columns (h, re/im):
                                                 the complex arithmetic is folded into the real matrix
    per bin: depthwise-like (one input channel per group) a complex multiply, broadcast over the batch;
             otherwise (bins, G) batched (B x 2Cg) @ (2Cg x 2Og) real block products
    inverse H: (2 out_h x 2P) @ (B, 2P, F*O)     only the kept output rows r = i * stride_h are computed
    inverse W: (out_w x 2F) @ (B*out_h, 2F, O)   only the kept columns, Hermitian weights folded in
  y (B, out_h, out_w, O)

Strides cost nothing extra here (the dropped outputs are never computed), unlike the `fft` path. The work
is O(P + Q) per pixel rather than O(log PQ), so it pays where the GEMMs run near the cores' peak and the
transforms are short; the cost model decides per device (implementation `fft-matmul`).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from . import backend
from .real_dft import real_forward_matrix, real_inverse_matrix

__all__ = ["dft_matrices", "matmul_spectrum", "matmul_correlate", "matmul_spectrum_shape"]


def dft_matrices(layout, height: int, width: int):
    """The four real DFT matrices of a full-image layout for an input of height x width (float32 numpy).

    forward_w (2F, W): rows (t, f), t = re/im: cos(2 pi f w / Q), -sin(2 pi f w / Q).
    forward_h (2P, 2H): rows (p, u), columns (h, t): X_re = cos Re + sin Im, X_im = -sin Re + cos Im.
    inverse_h (2 out_h, 2P): rows (i, v), columns (p, u), r = i * stride: V_re = (cos Z_re - sin Z_im) / P,
      V_im = (sin Z_re + cos Z_im) / P.
    inverse_w (out_w, 2F): columns (v, f), c = j * stride: y = w_f (cos V_re - sin V_im) / Q, where w_f is 1
      for f = 0 (and Q/2 when Q is even) and 2 otherwise: the bins a real inverse transform leaves implicit.
    Computed in float64, rounded once to float32.
    """
    p, q = layout.fft_shape
    rows, cols = layout.rows, layout.cols
    forward_w = real_forward_matrix(width, q).T  # (2F, W)
    th = 2 * np.pi * np.outer(np.arange(p), np.arange(height)) / p  # (P, H)
    c, s = np.cos(th), np.sin(th)
    forward_h = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], 1).reshape(2 * p, 2 * height)
    kept_r = np.arange(rows.out) * rows.stride
    ph = 2 * np.pi * np.outer(kept_r, np.arange(p)) / p  # (out_h, P)
    c, s = np.cos(ph) / p, np.sin(ph) / p
    inverse_h = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], 1).reshape(2 * rows.out, 2 * p)
    inverse_w = real_inverse_matrix(q)[:, np.arange(cols.out) * cols.stride].T  # (out_w, 2F): the kept columns
    return {name: m.astype("float32") for name, m in (
        ("forward_w", forward_w), ("forward_h", forward_h), ("inverse_h", inverse_h), ("inverse_w", inverse_w))}


def matmul_spectrum_shape(layout, groups: int, cg: int, cout: int):
    """Shape of the cached spectrum `matmul_spectrum` returns (float32)."""
    p, q = layout.fft_shape
    og = cout // groups
    if cg == 1:
        return (2, p, 2, q // 2 + 1, groups, og)
    return (p, q // 2 + 1, groups, 2 * cg, 2 * og)


def matmul_spectrum(spectrum, layout, groups: int):
    """The conjugate kernel spectrum laid out for `matmul_correlate`, float32.

    spectrum: (Cg, Cout, P, F) complex64, the conjugate spectrum of the (dilated, SAME-shifted) kernel
    (`fft.conjugate_kernel_spectrum`; a depthwise kernel as Cg = 1, Cout = C*M, groups = C).
    Depthwise-like (Cg == 1): (2, P, 2, F, G, Og): [K_re, K_re] and [-K_im, K_im] along the (re, im) axis.
    Otherwise the real block form of the (P, F, G, Cg, Og) complex spectrum with rows (re/im, c) and columns
    (re/im, o): (P, F, G, 2Cg, 2Og).
    """
    cg, cout = spectrum.shape[0], spectrum.shape[1]
    p, q = layout.fft_shape
    f = q // 2 + 1
    og = cout // groups
    spec = ops.transpose(ops.reshape(spectrum, (cg, groups, og, p, f)), (3, 4, 1, 0, 2))  # (P, F, G, Cg, Og)
    re, im = ops.real(spec), ops.imag(spec)
    if cg == 1:
        # z = x * [Kr; Kr] + flip(x, re/im) * [-Ki; Ki] along the (re, im) axis of x (B, P, 2, F, G, 1): two
        # broadcast multiplies and an add instead of slicing re and im apart and stacking them again
        re, im = re[:, :, :, 0], im[:, :, :, 0]  # (P, F, G, Og)
        return ops.stack([ops.stack([re, re], axis=1), ops.stack([-im, im], axis=1)], axis=0)
    top = ops.concatenate([re, im], axis=-1)  # input re rows: Y_re += X_re K_re, Y_im += X_re K_im
    bottom = ops.concatenate([-im, re], axis=-1)  # input im rows: Y_re -= X_im K_im, Y_im += X_im K_re
    return ops.concatenate([top, bottom], axis=-2)


def matmul_correlate(x, spectrum, matrices, layout, groups: int, cg: int):
    """Strided correlation of channels-last x (B, H, W, Cin) float32 with a `matmul_spectrum`.

    matrices: `dft_matrices(layout, H, W)` (as float32 arrays or tensors). Returns (B, out_h, out_w, Cout).
    """
    h, w, cin = x.shape[1], x.shape[2], x.shape[3]
    p, q = layout.fft_shape
    f = q // 2 + 1
    out_h, out_w = layout.rows.out, layout.cols.out
    mm = backend.matmul
    t = mm(matrices["forward_w"][None], ops.reshape(x, (-1, w, cin)))  # (B H, 2F, C): rows (t, f)
    t = mm(matrices["forward_h"][None], ops.reshape(t, (-1, 2 * h, f * cin)))  # (B, 2P, F C): rows (p, u)
    if cg == 1:
        og = spectrum.shape[-1]
        t = ops.reshape(t, (-1, p, 2, f, groups, 1))
        z = t * spectrum[0] + ops.flip(t, axis=2) * spectrum[1]  # (B, P, 2, F, G, Og): (re, im) of x K
        cout = groups * og
    else:
        og = spectrum.shape[-1] // 2
        cout = groups * og
        t = ops.transpose(ops.reshape(t, (-1, p, 2, f, groups, cg)), (1, 3, 4, 0, 2, 5))  # (P, F, G, B, 2, Cg)
        z = mm(ops.reshape(t, (p, f, groups, -1, 2 * cg)), spectrum)  # (P, F, G, B, 2 Og): (v, o)
        z = ops.transpose(ops.reshape(z, (p, f, groups, -1, 2, og)), (3, 0, 4, 1, 2, 5))  # (B, P, 2, F, G, Og)
    t = mm(matrices["inverse_h"][None], ops.reshape(z, (-1, 2 * p, f * cout)))  # (B, 2 out_h, F O): (i, v)
    y = mm(matrices["inverse_w"][None], ops.reshape(t, (-1, 2 * f, cout)))  # (B out_h, out_w, O)
    return ops.reshape(y, (-1, out_h, out_w, cout))
