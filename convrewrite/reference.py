"""numpy oracles for 2-D convolution, independent of TensorFlow and Keras.

Vectorized: the input is padded once, viewed as sliding windows (no copy), and contracted with the kernel
by one einsum per call, so there is no Python loop over pixels. Semantics match `tf.nn.conv2d` and
Keras `Conv2D` / `DepthwiseConv2D` exactly, including TF's asymmetric SAME padding.

All functions take and return channels_last arrays: x: (batch, H, W, Cin).
"""

from __future__ import annotations

import numpy as np

__all__ = ["same_padding", "pad_input", "conv2d", "depthwise_conv2d", "extract_patches"]


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(i) for i in v)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1):
    """(before, after) padding TF uses for SAME along one axis.

    SAME makes out = ceil(size / stride) and pads the total needed; when that total is odd TF puts the
    extra element *after* (bottom/right), which is why SAME is asymmetric and why a symmetric pad of
    k // 2 is wrong for even kernels and for strides > 1.
    """
    eff = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def pad_input(x, kernel, strides, dilation, padding):
    """Zero-pad x: (N, H, W, C) as `padding` ('same' | 'valid') requires for this kernel."""
    kernel, strides, dilation = _pair(kernel), _pair(strides), _pair(dilation)
    padding = padding.lower()
    if padding == "valid":
        return x
    if padding != "same":
        raise ValueError(f"Received padding={padding!r}; expected 'same' or 'valid'.")
    pads = [same_padding(x.shape[i + 1], kernel[i], strides[i], dilation[i]) for i in range(2)]
    return np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])


def extract_patches(x, kernel, strides=1, dilation=1, padding="valid"):
    """Sliding windows of x: (N, H, W, C) -> (N, Ho, Wo, C, kh, kw), a strided view where possible."""
    kernel, strides, dilation = _pair(kernel), _pair(strides), _pair(dilation)
    xp = pad_input(np.asarray(x), kernel, strides, dilation, padding)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    if xp.shape[1] < eff[0] or xp.shape[2] < eff[1]:
        n, _, _, c = xp.shape
        return np.zeros((n, 0, 0, c) + kernel, xp.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=(1, 2))
    return windows[:, :: strides[0], :: strides[1], :, :: dilation[0], :: dilation[1]]


def conv2d(x, kernel, bias=None, strides=1, padding="valid", dilation=1, groups=1, dtype=None):
    """Grouped 2-D convolution (cross-correlation, as in TF).

    x: (N, H, W, Cin); kernel: (kh, kw, Cin // groups, Cout); bias: (Cout,) or None.
    Returns (N, Ho, Wo, Cout) in `dtype` (default: x's dtype promoted with the kernel's).
    """
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    kh, kw, cg, cout = kernel.shape
    n, _, _, cin = x.shape
    if cin != cg * groups:
        raise ValueError(f"Received x with {cin} channels and kernel for {cg}x{groups} groups; expected equal.")
    if cout % groups:
        raise ValueError(f"Received {cout} filters for groups={groups}; expected a multiple.")
    patches = extract_patches(x, (kh, kw), strides, dilation, padding)  # (N, Ho, Wo, Cin, kh, kw)
    ho, wo = patches.shape[1:3]
    patches = patches.reshape(n, ho, wo, groups, cg, kh, kw)
    k = kernel.reshape(kh, kw, cg, groups, cout // groups)
    out = np.einsum("nhwgcij,ijcgo->nhwgo", patches, k, optimize=True).reshape(n, ho, wo, cout)
    if bias is not None:
        out = out + np.asarray(bias, dtype=out.dtype)
    return out


def depthwise_conv2d(x, kernel, bias=None, strides=1, padding="valid", dilation=1, dtype=None):
    """Depthwise convolution as Keras DepthwiseConv2D computes it.

    x: (N, H, W, C); kernel: (kh, kw, C, M) with depth multiplier M; output channel c * M + m.
    """
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    kh, kw, c, m = kernel.shape
    patches = extract_patches(x, (kh, kw), strides, dilation, padding)  # (N, Ho, Wo, C, kh, kw)
    n, ho, wo = patches.shape[:3]
    out = np.einsum("nhwcij,ijcm->nhwcm", patches, kernel, optimize=True).reshape(n, ho, wo, c * m)
    if bias is not None:
        out = out + np.asarray(bias, dtype=out.dtype)
    return out


def spec_forward(spec, x, weights, dtype=np.float64):
    """Reference output of the conv site `spec` (a ConvSpec) on x with the Keras layer's weights.

    x is in the spec's data_format; the activation is applied with Keras (it is not a convolution and
    every activation Keras has would otherwise need a twin here). Returns an array in spec.data_format.
    """
    channels_first = spec.data_format == "channels_first"
    x = np.asarray(x, dtype=dtype)
    if channels_first:
        x = x.transpose(0, 2, 3, 1)
    bias = weights[1] if spec.use_bias else None
    common = dict(strides=spec.strides, padding=spec.padding, dilation=spec.dilation, dtype=dtype)
    if spec.kind == "depthwise_conv2d":
        out = depthwise_conv2d(x, weights[0], bias, **common)
    else:
        out = conv2d(x, weights[0], bias, groups=spec.groups, **common)
    if spec.activation not in ("linear", None):
        import keras

        out = np.asarray(keras.ops.convert_to_numpy(keras.activations.get(spec.activation)(out)), dtype=dtype)
    if channels_first:
        out = out.transpose(0, 3, 1, 2)
    return out
