"""The FFT layers' spectral correlation with real arithmetic only: the transforms as matrix products and the
per-bin products on (real, imaginary) pairs.

For runtimes whose converters take no complex tensors (ONNX, OpenVINO, LiteRT: `backend.real_arithmetic`): an
FFT layer traced for such an export computes the same correlation as on its FFT path (same transform sizes,
the same kernel spectra, bins in the same order) with matmuls, slices, adds and multiplies. A complex value
travels as a pair axis of length 2 just before the last (half-spectrum) axis: (..., 2, F) holds the real part
at [..., 0, :] and the imaginary part at [..., 1, :]. The work per value is O(P) per axis rather than FFT's
O(log P): what a runtime without transform ops can run.

Every function takes channels-first blocks (B, C, *spatial) whose dimensions after the first are known when
traced (the layers' layouts fix them), as the FFT path does.
"""

from __future__ import annotations

import numpy as np
from keras import ops

__all__ = ["rdft", "irdft", "correlate", "real_forward_matrix", "real_inverse_matrix"]


def real_forward_matrix(n: int, p: int):
    """(n, 2F): x @ M = [Re X | Im X], the real DFT of length p of n real values (zero-padded to p)."""
    theta = 2 * np.pi * np.outer(np.arange(n), np.arange(p // 2 + 1)) / p
    return np.concatenate([np.cos(theta), -np.sin(theta)], 1).astype("float32")


def _forward_complex(n: int, p: int):
    """(2n, 2p): [re | im] @ M = [Re X | Im X], the complex DFT of length p of n values (zero-padded)."""
    theta = 2 * np.pi * np.outer(np.arange(n), np.arange(p)) / p
    c, s = np.cos(theta), np.sin(theta)
    return np.block([[c, -s], [s, c]]).astype("float32")


def _inverse_complex(p: int):
    """(2p, 2p): [Re X | Im X] @ M = [re | im], the inverse complex DFT of length p (scaled by 1 / p)."""
    theta = 2 * np.pi * np.outer(np.arange(p), np.arange(p)) / p
    c, s = np.cos(theta) / p, np.sin(theta) / p
    return np.block([[c, s], [-s, c]]).astype("float32")


def real_inverse_matrix(p: int):
    """(2F, p): [Re X | Im X] @ M = x, the inverse real DFT of length p from its p // 2 + 1 bins (the bins a
    real inverse leaves implicit counted twice; the imaginary parts of bin 0 and, p even, of bin p / 2 unused,
    as an inverse real FFT does)."""
    f = np.arange(p // 2 + 1)
    weight = (np.where((f == 0) | ((p % 2 == 0) & (f == p // 2)), 1.0, 2.0) / p)[:, None]
    theta = 2 * np.pi * np.outer(f, np.arange(p)) / p
    return np.concatenate([weight * np.cos(theta), -weight * np.sin(theta)], 0).astype("float32")


def _along(z, axis: int, matrix):
    """Apply a complex (2n, 2m) `matrix` along spatial `axis` of pairs z (..., 2, F): that axis (length n)
    and the half-spectrum axis trade places, the pair and the axis form the rows, one matmul, and back."""
    rank = len(z.shape)
    perm = list(range(rank))
    perm[axis], perm[rank - 1] = rank - 1, axis
    t = ops.transpose(z, perm)  # (..., F at `axis`, ..., 2, n)
    n, m = matrix.shape[0] // 2, matrix.shape[1] // 2
    kept = tuple(t.shape[1:-2])
    t = ops.matmul(ops.reshape(t, (-1, *kept, 2 * n)), matrix)
    return ops.transpose(ops.reshape(t, (-1, *kept, 2, m)), perm)


def rdft(x, fft_shape):
    """x: (B, C, n_1, ..., n_k) float32, n_i <= P_i -> pairs (B, C, P_1, ..., P_{k-1}, 2, P_k // 2 + 1): the
    real DFT of x zero-padded to fft_shape = (P_1, ..., P_k) (what `backend.rfft2d` computes for k = 2)."""
    k = len(fft_shape)
    spatial = tuple(x.shape[-k:])
    last = real_forward_matrix(spatial[-1], fft_shape[-1])
    z = ops.matmul(x, last)  # (B, C, n_1, ..., n_{k-1}, 2F)
    z = ops.reshape(z, (-1, *z.shape[1:-1], 2, last.shape[1] // 2))
    for i in range(k - 1):
        z = _along(z, 2 + i, _forward_complex(spatial[i], fft_shape[i]))
    return z


def irdft(z, fft_shape):
    """Inverse of `rdft`: pairs (B, C, P_1, ..., P_{k-1}, 2, F) -> (B, C, P_1, ..., P_k) float32."""
    k = len(fft_shape)
    for i in range(k - 1):
        z = _along(z, 2 + i, _inverse_complex(fft_shape[i]))
    last = real_inverse_matrix(fft_shape[-1])
    return ops.matmul(ops.reshape(z, (-1, *z.shape[1:-2], last.shape[0])), last)


def correlate(x, spectrum, fft_shape, groups: int, cg: int):
    """Stride-1 correlation of channels-first blocks x (B, Cin, *n) with a kernel's conjugate spectrum
    -> (B, Cout, *fft_shape) float32, outputs at [0, span) on each axis, as the FFT layers' own correlation.

    spectrum: for Cg > 1 the real block form (bins, G, 2 Cg, 2 Og) (`backend.real_block`, rows and columns
    interleaved (channel, re/im)); for Cg == 1 the complex (G, Og, bins) spectrum as pairs (2, G, Og, bins)."""
    z = rdft(x, fft_shape)
    lead = tuple(z.shape[2:-2])  # P_1 .. P_{k-1}
    bins = int(np.prod(lead, dtype=np.int64)) * z.shape[-1]
    re, im = (ops.reshape(z[..., i, :], (-1, groups, cg, bins)) for i in (0, 1))
    if cg == 1:
        og = spectrum.shape[2]
        sr, si = spectrum[0], spectrum[1]  # (G, Og, bins)
        yr, yi = re * sr - im * si, re * si + im * sr  # (B, G, Og, bins)
    else:
        og = spectrum.shape[-1] // 2
        pairs = ops.stack([ops.transpose(re, (3, 1, 0, 2)), ops.transpose(im, (3, 1, 0, 2))], -1)
        y = ops.matmul(ops.reshape(pairs, (bins, groups, -1, 2 * cg)), spectrum)  # (bins, G, B, 2 Og)
        y = ops.reshape(y, (bins, groups, -1, og, 2))
        yr, yi = (ops.transpose(y[..., i], (2, 1, 3, 0)) for i in (0, 1))  # (B, G, Og, bins)
    shape = (-1, groups * og, *lead, z.shape[-1])
    return irdft(ops.stack([ops.reshape(yr, shape), ops.reshape(yi, shape)], -2), fft_shape)
