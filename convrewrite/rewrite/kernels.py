"""Kernel arithmetic of the re-parameterizing rewrites: pure numpy, float64, no Keras.

Keras kernel layouts (spatial axes first, `r` of them):
    conv       (k1..kr, Cin/groups, Cout)     output channel o on the last axis
    depthwise  (k1..kr, Cin, M)               output channel c*M + m on the last two axes
    transpose  (k1..kr, Cout, Cin)            output channel o on the second-to-last axis
"""

from __future__ import annotations

import numpy as np

CONV, DEPTHWISE, TRANSPOSE = "conv", "depthwise", "transpose"


def bn_scale_shift(gamma, beta, mean, variance, epsilon):
    """(s, t) with BN(x) = s * x + t per channel at inference: s = gamma / sqrt(var + eps), t = beta - mean * s.

    gamma / beta: None where the BN has scale=False / center=False (then 1 / 0)."""
    mean = np.asarray(mean, np.float64)
    s = 1.0 / np.sqrt(np.asarray(variance, np.float64) + float(epsilon))
    if gamma is not None:
        s = s * np.asarray(gamma, np.float64)
    t = -mean * s
    if beta is not None:
        t = t + np.asarray(beta, np.float64)
    return s, t


def scale_output_channels(kernel, s, layout: str):
    """The kernel with output channel o multiplied by s[o] (shapes as in the module docstring)."""
    kernel = np.asarray(kernel, np.float64)
    s = np.asarray(s, np.float64)
    if layout == CONV:
        return kernel * s
    if layout == DEPTHWISE:
        return kernel * s.reshape(kernel.shape[-2:])
    if layout == TRANSPOSE:
        return kernel * s[:, None]
    raise ValueError(f"Received layout={layout!r}; expected one of {CONV!r}, {DEPTHWISE!r}, {TRANSPOSE!r}.")


def fold(kernel, bias, s, t, layout: str):
    """(kernel', bias') of a conv followed by `y -> s * y + t` per output channel, as one conv.

    bias: the conv's bias (Cout,), or None for use_bias=False."""
    bias = np.zeros(len(s)) if bias is None else np.asarray(bias, np.float64)
    return scale_output_channels(kernel, s, layout), bias * s + t


def dilate(kernel, rate, rank: int):
    """The dense kernel of a dilated one: (k-1)*rate+1 taps per spatial axis, zeros between the originals."""
    kernel = np.asarray(kernel, np.float64)
    rate = tuple(int(r) for r in rate)
    size = tuple((k - 1) * d + 1 for k, d in zip(kernel.shape[:rank], rate))
    out = np.zeros(size + kernel.shape[rank:])
    out[tuple(slice(None, None, d) for d in rate)] = kernel
    return out


def pad_to(kernel, size, offsets, rank: int):
    """The kernel zero-padded on its `rank` spatial axes to `size`, its taps starting at `offsets` (one per
    axis, 0 <= offset <= size - k): where the larger kernel's window reads the input positions this one read
    (see merge_branches for the offsets TF's padding implies)."""
    kernel = np.asarray(kernel, np.float64)
    pads = []
    for k, n, o in zip(kernel.shape[:rank], size, offsets):
        if not 0 <= o <= n - k:
            raise ValueError(f"Cannot place a kernel of size {k} at offset {o} in {n}; expected 0 <= offset <= {n - k}.")
        pads.append((o, n - k - o))
    return np.pad(kernel, pads + [(0, 0)] * (kernel.ndim - rank))


def pad_centred(kernel, size, rank: int):
    """pad_to with the taps in the centre (each side grows by (K-k)/2: a stride-1 'same' conv)."""
    shape = np.shape(kernel)[:rank]
    if any((n - k) % 2 for k, n in zip(shape, size)):
        raise ValueError(f"Cannot centre a kernel of size {shape} in {tuple(size)}; expected even differences.")
    return pad_to(kernel, size, [(n - k) // 2 for k, n in zip(shape, size)], rank)


def identity_kernel(size, channels: int, groups: int, layout: str, offsets=None):
    """A kernel of spatial `size` computing y = x (channels in = out), the 1 at tap `offsets` (default the
    centre).

    conv: (size, channels/groups, channels), output o reads input o, which is its group's (o % per-group)-th;
    depthwise: (size, channels, 1)."""
    centre = tuple(k // 2 for k in size) if offsets is None else tuple(offsets)
    if layout == DEPTHWISE:
        kernel = np.zeros(tuple(size) + (channels, 1))
        kernel[centre + (slice(None), 0)] = 1.0
        return kernel
    per_group = channels // groups
    kernel = np.zeros(tuple(size) + (per_group, channels))
    outputs = np.arange(channels)
    kernel[centre + (outputs % per_group, outputs)] = 1.0
    return kernel


def same_padding_before(size: int, kernel: int, stride: int) -> int:
    """Padding TF puts before the data on one axis for padding='same' (the larger half goes after)."""
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0) // 2
