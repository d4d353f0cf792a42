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
    if xp.shape[1] < eff[0] or xp.shape[2] < eff[1]:  # no window fits along some axis: empty along it only
        n, h, w, c = xp.shape
        ho = -(-(h - eff[0] + 1) // strides[0]) if h >= eff[0] else 0
        wo = -(-(w - eff[1] + 1) // strides[1]) if w >= eff[1] else 0
        return np.zeros((n, ho, wo, c) + kernel, xp.dtype)
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


def spec_forward(spec, x, weights, dtype=np.float64, activation=None):
    """Reference output of the conv site `spec` (a ConvSpec) on x with the Keras layer's weights.

    x is in the spec's data_format; the activation is applied with Keras (it is not a convolution and
    every activation Keras has would otherwise need a twin here): `activation` if given (the layer's own
    callable, e.g. a lambda, which a spec names only by its serialized form), else spec.activation.
    Returns an array in spec.data_format.
    """
    channels_first = spec.data_format == "channels_first"
    x = np.asarray(x, dtype=dtype)
    if spec.kind == "conv3d":
        return _spec_forward_3d(spec, x, weights, dtype, activation)
    one_d = spec.kind in ("conv1d", "depthwise_conv1d")
    if one_d:  # (N, L, C) / (N, C, L) -> a height-1 image
        x = x[:, :, None, :] if channels_first else x[:, None]
    if channels_first:
        x = x.transpose(0, 2, 3, 1)
    bias = weights[1] if spec.use_bias else None
    common = dict(strides=spec.strides, padding=spec.padding, dilation=spec.dilation, dtype=dtype)
    if spec.kind in ("conv1d", "depthwise_conv1d"):  # x: (N, 1, L, C) here: a height-1 spec
        common.update(strides=spec.strides[1], dilation=spec.dilation[1])
        if spec.kind == "conv1d":
            out = conv1d(x[:, 0], weights[0], bias, groups=spec.groups, **common)[:, None]
        else:
            out = depthwise_conv1d(x[:, 0], weights[0], bias, **common)[:, None]
    elif spec.kind == "depthwise_conv2d":
        out = depthwise_conv2d(x, weights[0], bias, **common)
    elif spec.kind == "separable_conv2d":
        bias = weights[2] if spec.use_bias else None
        out = separable_conv2d(x, weights[0], weights[1], bias, **common)
    elif spec.kind == "conv2d_transpose":
        out = conv2d_transpose(x, weights[0], bias, output_padding=spec.output_padding, **common)
    else:
        out = conv2d(x, weights[0], bias, groups=spec.groups, **common)
    if activation is not None or spec.activation not in ("linear", None):
        import keras

        fn = activation if activation is not None else keras.activations.get(spec.activation)
        out = np.asarray(keras.ops.convert_to_numpy(fn(out)), dtype=dtype)
    if channels_first:
        out = out.transpose(0, 3, 1, 2)
    if one_d:
        out = out[:, :, 0] if channels_first else out[:, 0]
    return out


# ==== 1-D convolution (Keras Conv1D / DepthwiseConv1D) ==========================================
# x: (batch, steps, C), channels_last. 'causal' pads (k - 1) * d zeros before the sequence and none after,
# so output t sees inputs <= t only; 'same' and 'valid' are TF's rules along the one axis.

__all__ += ["pad_input_1d", "conv1d", "depthwise_conv1d"]


def pad_input_1d(x, kernel: int, stride: int, dilation: int, padding: str):
    """Zero-pad x: (N, L, C) along L as `padding` ('valid' | 'same' | 'causal') requires."""
    padding = padding.lower()
    if padding == "valid":
        return x
    if padding == "causal":
        pads = ((kernel - 1) * dilation, 0)
    elif padding == "same":
        pads = same_padding(x.shape[1], kernel, stride, dilation)
    else:
        raise ValueError(f"Received padding={padding!r}; expected 'same', 'valid' or 'causal'.")
    return np.pad(x, [(0, 0), pads, (0, 0)])


def _windows_1d(x, kernel: int, stride: int, dilation: int, padding: str):
    """(N, Lo, C, k) sliding windows of x: (N, L, C) (a strided view where possible)."""
    xp = pad_input_1d(np.asarray(x), kernel, stride, dilation, padding)
    eff = (kernel - 1) * dilation + 1
    if xp.shape[1] < eff:
        return np.zeros((xp.shape[0], 0, xp.shape[2], kernel), xp.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=1)  # (N, L - eff + 1, C, eff)
    return windows[:, ::stride, :, ::dilation]


def conv1d(x, kernel, bias=None, strides=1, padding="valid", dilation=1, groups=1, dtype=None):
    """Grouped 1-D convolution (cross-correlation) as Keras Conv1D computes it.

    x: (N, L, Cin); kernel: (k, Cin // groups, Cout); bias: (Cout,) or None -> (N, Lo, Cout)."""
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    k, cg, cout = kernel.shape
    n, _, cin = x.shape
    if cin != cg * groups or cout % groups:
        raise ValueError(f"Received x with {cin} channels, kernel {kernel.shape} and groups={groups}; expected "
                         f"Cin = groups x kernel's Cin and Cout a multiple of groups.")
    win = _windows_1d(x, k, int(strides), int(dilation), padding)  # (N, Lo, Cin, k)
    lo = win.shape[1]
    win = win.reshape(n, lo, groups, cg, k)
    kk = kernel.reshape(k, cg, groups, cout // groups)
    out = np.einsum("nlgci,icgo->nlgo", win, kk, optimize=True).reshape(n, lo, cout)
    if bias is not None:
        out = out + np.asarray(bias, dtype=out.dtype)
    return out


def depthwise_conv1d(x, kernel, bias=None, strides=1, padding="valid", dilation=1, dtype=None):
    """Depthwise 1-D convolution as Keras DepthwiseConv1D computes it.

    x: (N, L, C); kernel: (k, C, M) with depth multiplier M; output channel c * M + m -> (N, Lo, C * M)."""
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    k, c, m = kernel.shape
    win = _windows_1d(x, k, int(strides), int(dilation), padding)  # (N, Lo, C, k)
    n, lo = win.shape[:2]
    out = np.einsum("nlci,icm->nlcm", win, kernel, optimize=True).reshape(n, lo, c * m)
    if bias is not None:
        out = out + np.asarray(bias, dtype=out.dtype)
    return out


# ==== 3-D convolution (Keras Conv3D) ===========================================================
# x: (batch, D, H, W, Cin), kernel (kd, kh, kw, Cin // groups, Cout); TF's SAME rules on every axis.

__all__ += ["conv3d"]


def _triple(v):
    return (int(v),) * 3 if np.isscalar(v) else tuple(int(i) for i in v)


def conv3d(x, kernel, bias=None, strides=1, padding="valid", dilation=1, groups=1, dtype=None):
    """Grouped 3-D convolution (cross-correlation) as Keras Conv3D computes it -> (N, Do, Ho, Wo, Cout)."""
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    strides, dilation = _triple(strides), _triple(dilation)
    kd, kh, kw, cg, cout = kernel.shape
    n, _, _, _, cin = x.shape
    if cin != cg * groups or cout % groups:
        raise ValueError(f"Received x with {cin} channels, kernel {kernel.shape} and groups={groups}; expected "
                         f"Cin = groups x kernel's Cin and Cout a multiple of groups.")
    eff = [(k - 1) * d + 1 for k, d in zip((kd, kh, kw), dilation)]
    if padding.lower() == "same":
        pads = [same_padding(x.shape[i + 1], k, s, d) for i, (k, s, d) in enumerate(zip((kd, kh, kw), strides, dilation))]
        x = np.pad(x, [(0, 0), *pads, (0, 0)])
    elif padding.lower() != "valid":
        raise ValueError(f"Received padding={padding!r}; expected 'same' or 'valid'.")
    if any(x.shape[i + 1] < eff[i] for i in range(3)):
        return np.zeros((n, 0, 0, 0, cout), x.dtype)
    win = np.lib.stride_tricks.sliding_window_view(x, eff, axis=(1, 2, 3))  # (N, D', H', W', C, ed, eh, ew)
    win = win[:, :: strides[0], :: strides[1], :: strides[2], :, :: dilation[0], :: dilation[1], :: dilation[2]]
    do, ho, wo = win.shape[1:4]
    win = win.reshape(n, do, ho, wo, groups, cg, kd, kh, kw)
    k = kernel.reshape(kd, kh, kw, cg, groups, cout // groups)
    out = np.einsum("ndhwgcijl,ijlcgo->ndhwgo", win, k, optimize=True).reshape(n, do, ho, wo, cout)
    if bias is not None:
        out = out + np.asarray(bias, dtype=out.dtype)
    return out


def _spec_forward_3d(spec, x, weights, dtype, activation):
    channels_first = spec.data_format == "channels_first"
    if channels_first:
        x = x.transpose(0, 2, 3, 4, 1)
    out = conv3d(x, weights[0], weights[1] if spec.use_bias else None, groups=spec.groups, padding=spec.padding,
                 strides=(spec.stride_depth, *spec.strides), dilation=(spec.dilation_depth, *spec.dilation), dtype=dtype)
    if activation is not None or spec.activation not in ("linear", None):
        import keras

        fn = activation if activation is not None else keras.activations.get(spec.activation)
        out = np.asarray(keras.ops.convert_to_numpy(fn(out)), dtype=dtype)
    return out.transpose(0, 4, 1, 2, 3) if channels_first else out


# ==== transposed and separable convolution =======================================================
__all__ += ["conv2d_transpose_length", "conv2d_transpose", "separable_conv2d"]


def conv2d_transpose_length(size: int, kernel: int, stride: int, padding: str, output_padding=None, dilation: int = 1):
    """Output length of Keras's Conv2DTranspose along one axis (see `conv2d_transpose`)."""
    eff = (kernel - 1) * dilation + 1
    if output_padding is None:
        return size * stride + (0 if padding == "same" else max(eff - stride, 0))
    pad = eff // 2 if padding == "same" else 0
    return (size - 1) * stride + eff - 2 * pad + output_padding


def conv2d_transpose(x, kernel, bias=None, strides=1, padding="valid", dilation=1, output_padding=None, dtype=None):
    """Transposed convolution as Keras Conv2DTranspose (tf.nn.conv2d_transpose) computes it: the gradient of
    the forward convolution `padding` from an (L, L') input to x's size, with respect to that input.

    x: (N, H, W, Cin); kernel: (kh, kw, Cout, Cin) as Conv2DTranspose stores it; bias: (Cout,) or None.
    Every input pixel i scatters x[i] W[t] to the uncropped output position i * s + t * d; the result is the
    window [pb, pb + L) of that, where L is Keras's output length and pb the top/left pad the forward
    convolution would use on an L-long input (SAME: TF's asymmetric pad; VALID: 0). Returns (N, L, L', Cout).
    """
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    strides, dilation = _pair(strides), _pair(dilation)
    ops = (None, None) if output_padding is None else _pair(output_padding)
    n, h, w, _ = x.shape
    kh, kw, cout, _ = kernel.shape
    sizes, pbs, fulls = [], [], []
    for m, k, s, d, op in zip((h, w), (kh, kw), strides, dilation, ops):
        length = conv2d_transpose_length(m, k, s, padding, op, d)
        eff = (k - 1) * d + 1
        if padding == "same" and -(-length // s) != m:  # TF refuses these (even kernel, output_padding 0)
            raise ValueError(f"Received output_padding={output_padding} with SAME and kernel {k}; expected an output "
                             f"length ({length}) that a SAME convolution with stride {s} maps back to {m}.")
        pb = same_padding(length, k, s, d)[0] if padding == "same" else 0
        sizes.append(length)
        pbs.append(pb)
        fulls.append(max((m - 1) * s + eff, pb + length))
    full = np.zeros((n, fulls[0], fulls[1], cout), np.result_type(x, kernel))
    for a in range(kh):  # one vectorized scatter per kernel tap
        for b in range(kw):
            r0, c0 = a * dilation[0], b * dilation[1]
            full[:, r0: r0 + (h - 1) * strides[0] + 1: strides[0], c0: c0 + (w - 1) * strides[1] + 1: strides[1]] += \
                np.einsum("nhwc,oc->nhwo", x, kernel[a, b])
    out = full[:, pbs[0]: pbs[0] + sizes[0], pbs[1]: pbs[1] + sizes[1]]
    if bias is not None:
        out = out + np.asarray(bias, dtype=out.dtype)
    return out


def separable_conv2d(x, depthwise_kernel, pointwise_kernel, bias=None, strides=1, padding="valid", dilation=1,
                     dtype=None):
    """SeparableConv2D: the depthwise convolution (kh, kw, C, M), then a 1x1 convolution (1, 1, C*M, F), then bias.

    x: (N, H, W, C) -> (N, Ho, Wo, F)."""
    mid = depthwise_conv2d(x, depthwise_kernel, None, strides=strides, padding=padding, dilation=dilation, dtype=dtype)
    pw = np.asarray(pointwise_kernel, dtype=dtype)
    out = np.einsum("nhwc,cf->nhwf", mid, pw.reshape(pw.shape[-2], pw.shape[-1]), optimize=True)
    if bias is not None:
        out = out + np.asarray(bias, dtype=out.dtype)
    return out


# ==== PAC: pixel-adaptive convolution (owned by convrewrite/layers/pac/) ==========================
# Independent numpy oracles for PacConv2D / PacConv2DTranspose / PacPool2D, built from the definition
#     v'_i = sum_j K(f_i, f_j) W[p_i - p_j] v_j + b
# with the conventions documented in convrewrite/layers/pac/: x is zero-padded as Conv2D pads it, the
# guidance is edge-padded, f_i is the guidance under the window's centre tap (kh // 2, kw // 2), and with
# normalize_kernel only taps on real pixels count. Vectorized: sliding-window views and einsum (the
# transpose scatters one kernel tap at a time over all pixels at once); no loop over pixels.

__all__ += ["pac_kernel_values", "pac_conv2d", "pac_conv2d_transpose", "pac_pool2d"]


def pac_kernel_values(d2, kernel_type="gaussian", inv_alpha=None, inv_lambda=None, kernel_blend=None):
    """K from squared guidance distances d2 (any shape).

    gaussian: exp(-d2 / 2); 'inv_<a>_<l>[_fixed]': (1 + d2 / a) ** (-l / 2), where inv_alpha/inv_lambda
    (if given) override a/l (learned values). kernel_blend b: K' = 1 + b * (K - 1)."""
    d2 = np.asarray(d2)
    if kernel_type == "gaussian":
        k = np.exp(-0.5 * d2)
    elif isinstance(kernel_type, str) and kernel_type.startswith("inv_"):
        parts = kernel_type.split("_")
        a = float(parts[1]) if inv_alpha is None else abs(float(inv_alpha)) + 1e-6
        lam = float(parts[2]) if inv_lambda is None else float(inv_lambda)
        if inv_alpha is None:
            a = a + 1e-6  # the layer's |alpha| + eps
        k = (1.0 + d2 / a) ** (-0.5 * lam)
    else:
        raise ValueError(f"Received kernel_type={kernel_type!r}; expected 'gaussian' or 'inv_<alpha>_<lambda>'.")
    if kernel_blend is not None:
        k = 1.0 + kernel_blend * (k - 1.0)
    return k


def _pac_window_kernel(guidance, x_hw, kernel, strides, dilation, padding, normalize, dtype, **kernel_args):
    """K for every output pixel and tap: (N, Ho, Wo, kh, kw), validity-masked and normalized as asked."""
    kernel, strides, dilation = _pair(kernel), _pair(strides), _pair(dilation)
    g = np.asarray(guidance, dtype=dtype)
    if padding.lower() == "same":
        pads = [same_padding(x_hw[i], kernel[i], strides[i], dilation[i]) for i in range(2)]
        g = np.pad(g, [(0, 0), pads[0], pads[1], (0, 0)], mode="edge")
    gpat = extract_patches(g, kernel, strides, dilation, "valid")  # (N, Ho, Wo, F, kh, kw)
    fc = gpat[..., kernel[0] // 2, kernel[1] // 2]
    d2 = np.sum((gpat - fc[..., None, None]) ** 2, axis=3)
    k = pac_kernel_values(d2, **kernel_args)
    if normalize:
        ones = np.ones((1,) + tuple(x_hw) + (1,), dtype)
        k = k * extract_patches(ones, kernel, strides, dilation, padding)[:, :, :, 0]
        norm = k.sum(axis=(3, 4), keepdims=True)
        k = k / np.where(norm == 0, 1.0, norm)
    return k


def pac_conv2d(x, guidance, kernel, bias=None, strides=1, padding="valid", dilation=1, kernel_type="gaussian",
               normalize_kernel=False, kernel_blend=None, guidance_scale=None, inv_alpha=None, inv_lambda=None,
               dtype=np.float64):
    """PacConv2D's output. x: (N, H, W, Cin); guidance: (N, H, W, F) (same size, no resizing here);
    kernel: (kh, kw, Cin, Cout); bias: (Cout,) or None; guidance_scale: (F,) or None. -> (N, Ho, Wo, Cout)."""
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    g = np.asarray(guidance, dtype=dtype)
    if guidance_scale is not None:
        g = g * np.asarray(guidance_scale, dtype=dtype)
    kh, kw = kernel.shape[:2]
    k = _pac_window_kernel(g, x.shape[1:3], (kh, kw), strides, dilation, padding, normalize_kernel, dtype,
                           kernel_type=kernel_type, inv_alpha=inv_alpha, inv_lambda=inv_lambda,
                           kernel_blend=kernel_blend)
    patches = extract_patches(x, (kh, kw), strides, dilation, padding)  # (N, Ho, Wo, Cin, kh, kw)
    out = np.einsum("nhwcij,nhwij,ijco->nhwo", patches, k, kernel, optimize=True)
    if bias is not None:
        out = out + np.asarray(bias, dtype=dtype)
    return out


def pac_pool2d(x, guidance, pool_size, strides=None, padding="valid", dilation=1, kernel_type="gaussian",
               normalize_kernel=True, kernel_blend=None, guidance_scale=None, inv_alpha=None, inv_lambda=None,
               dtype=np.float64):
    """PacPool2D's output: out_c[i] = sum_j K(f_i, f_j) x_c[j]. x: (N, H, W, C) -> (N, Ho, Wo, C)."""
    pool_size = _pair(pool_size)
    strides = pool_size if strides is None else _pair(strides)
    x = np.asarray(x, dtype=dtype)
    g = np.asarray(guidance, dtype=dtype)
    if guidance_scale is not None:
        g = g * np.asarray(guidance_scale, dtype=dtype)
    k = _pac_window_kernel(g, x.shape[1:3], pool_size, strides, dilation, padding, normalize_kernel, dtype,
                           kernel_type=kernel_type, inv_alpha=inv_alpha, inv_lambda=inv_lambda,
                           kernel_blend=kernel_blend)
    patches = extract_patches(x, pool_size, strides, dilation, padding)
    return np.einsum("nhwcij,nhwij->nhwc", patches, k, optimize=True)


def pac_conv2d_transpose(x, guidance, kernel, bias=None, strides=1, padding="valid", kernel_type="gaussian",
                         normalize_kernel=False, kernel_blend=None, guidance_scale=None, inv_alpha=None,
                         inv_lambda=None, dtype=np.float64):
    """PacConv2DTranspose's output, by scattering: out[o] += K(g[o], g[i*s]) * W[t] x[i] for o = i*s + t - pb.

    x: (N, H, W, Cin); guidance: (N, Ho, Wo, F) at the output size; kernel: (kh, kw, Cout, Cin) as
    Conv2DTranspose stores it. Ho = H*s for 'same' (pb = max(k - s, 0) // 2), H*s + max(k - s, 0) for
    'valid' (pb = 0). Input pixel i sits at output pixel i*s (its guidance), f_o is the guidance at o.
    """
    x = np.asarray(x, dtype=dtype)
    kernel = np.asarray(kernel, dtype=dtype)
    g = np.asarray(guidance, dtype=dtype)
    if guidance_scale is not None:
        g = g * np.asarray(guidance_scale, dtype=dtype)
    (sh, sw), padding = _pair(strides), padding.lower()
    n, h, w, _ = x.shape
    kh, kw, cout, _ = kernel.shape
    size = [(m * s if padding == "same" else m * s + max(k - s, 0)) for m, k, s in ((h, kh, sh), (w, kw, sw))]
    pb = [(max(k - s, 0) // 2 if padding == "same" else 0) for k, s in ((kh, sh), (kw, sw))]
    if g.shape[1:3] != tuple(size):
        raise ValueError(f"Received guidance of spatial size {g.shape[1:3]}; expected the output size {tuple(size)}.")
    num = np.zeros((n, size[0], size[1], cout), dtype)
    den = np.zeros((n, size[0], size[1]), dtype)
    src = g[:, ::sh, ::sw][:, :h, :w]  # guidance of input pixel i: g[i*s]
    for a in range(kh):  # kernel taps only; every pixel of a tap is one vectorized scatter
        for b in range(kw):
            rows, cols = np.arange(h) * sh + a - pb[0], np.arange(w) * sw + b - pb[1]
            ri, ci = (rows >= 0) & (rows < size[0]), (cols >= 0) & (cols < size[1])
            ro, co = rows[ri][:, None], cols[ci][None, :]
            dst = g[:, ro, co]  # (N, h', w', F): f at the receiving output pixels
            kv = pac_kernel_values(np.sum((dst - src[:, ri][:, :, ci]) ** 2, axis=-1), kernel_type=kernel_type,
                                   inv_alpha=inv_alpha, inv_lambda=inv_lambda, kernel_blend=kernel_blend)
            contrib = np.einsum("nhwc,oc->nhwo", x[:, ri][:, :, ci], kernel[a, b])
            num[:, ro, co] += kv[..., None] * contrib
            den[:, ro, co] += kv
    out = num / np.where(den == 0, 1.0, den)[..., None] if normalize_kernel else num
    if bias is not None:
        out = out + np.asarray(bias, dtype=dtype)
    return out
