"""Conv2DTranspose as ordinary stride-1 convolutions: the sub-pixel decomposition, run directly or through FFTs.

A transposed convolution scatters every input pixel i, times the kernel, to the output positions i * s + t
(t < k, one kernel tap each), then crops the window [pb, pb + L) (L: Keras's output length, pb: the pad the
forward convolution it transposes would use). Split the uncropped output F by phase r = q mod s: position
q = m * s + r receives x[m - j] W[r + j * s] for j = 0 .. J - 1, J = ceil(k / s). So every phase is an
ordinary ("full") convolution of x with a J-tap sub-kernel, and all s * s phases together are one Conv2D:

    F[m * s + r] = sum_u xpad[m + u] K[u, (r, f)],   K[u, (r, f)] = W[r + (J - 1 - u) * s, f],
    xpad = x zero-padded by J - 1 on both sides, K: (Jh, Jw, Cin, sh * sw * Cout), taps past k are zero,

followed by depth_to_space (phase channels -> pixels) and the crop. No zeros are inserted into the input:
the stride-2 4x4 decoder conv becomes a 2x2 conv with 4x the output channels on the un-dilated input.
At stride 1 (J = k) this is just the correlation of the (k_eff - 1)-padded input with the flipped kernel,
dilation included. The stride-1 convolution runs either through Keras's conv ("conv") or through the
FFT machinery of layers/fft.py with a cached kernel spectrum ("fft", for large kernels).

x: (batch, H, W, Cin) or channels_first; kernel (kh, kw, Cout, Cin) as Conv2DTranspose stores it.

Non-finite values: where the sub-kernels hold zero taps (k not a multiple of s), x[i] also meets those zeros,
so a NaN/Inf in x would reach outputs Keras leaves finite (NaN * 0); a NaN/Inf kernel tap likewise meets the
zero padding of x. Such calls, and every call the FFT cannot compute exactly (see `_fft_is_exact` in
layers/fft.py), run Keras's own Conv2DTranspose instead.
"""

from __future__ import annotations

import math
from typing import Optional

import keras
from keras import ops

from ..registry import Implementation, io_bytes, register
from ..spec import ConvSpec
from . import backend
from .fft import FFT_ERROR_SCALE, FFT_ERROR_TERMS_CAP, choose_fft_layout, fft_cost_features, float32_kernel_reader, \
    float32_weights, guarded, kernel_spectrum, spectral_correlate, use_cached_transform

__all__ = ["SubpixelConv2DTranspose", "TransposeSubpixelImplementation", "TransposeFFTImplementation",
           "phase_kernel", "phase_axis", "phase_spec",
           "undefined_output_padding"]

METHODS = ("conv", "fft")
F32_MAX = 3.4028234663852886e38


# ---- pure arithmetic -----------------------------------------------------------------------------
def phase_axis(kernel: int, stride: int, dilation: int, padding: str, output_padding: Optional[int]):
    """Static geometry of one axis: (J, pad, pb, cut).

    J: sub-kernel taps (ceil(k / s); k at stride 1, where dilation is passed to the conv instead);
    pad: zeros added to each side of x ((J - 1) * d); pb: the crop's start in the uncropped output;
    cut: positions to drop at the end of the uncropped output (negative: zeros to append). All are
    independent of the input length, so unknown spatial sizes work too."""
    k_eff = (kernel - 1) * dilation + 1
    j = -(-kernel // stride)
    pad = (j - 1) * dilation
    tail = ((j - 1) * dilation + 1) * stride  # uncropped length minus (n - 1) * s
    if output_padding is None:
        c = stride if padding == "same" else stride + max(k_eff - stride, 0)
    else:
        c = k_eff - 2 * (k_eff // 2 if padding == "same" else 0) + output_padding
    # L = (n - 1) * s + c; the forward SAME conv on L pads max((n - 1) s + k_eff - L, 0) in all, half before
    pb = max(k_eff - c, 0) // 2 if padding == "same" else 0
    return j, pad, pb, tail - pb - c


def undefined_output_padding(kernel, dilation, padding: str, output_padding) -> bool:
    """True where Keras's Conv2DTranspose output length is not one the forward convolution maps back to the
    input length (SAME, even effective kernel, output_padding 0 on some axis: the output is one short), so
    TensorFlow refuses the call; such a layer has no output to reproduce."""
    if padding != "same" or output_padding is None:
        return False
    return any((k - 1) * d % 2 == 1 and p == 0 for k, d, p in zip(kernel, dilation, output_padding))


def phase_kernel(kernel, strides):
    """kernel: (kh, kw, Cout, Cin) -> K: (Jh, Jw, Cin, sh * sw * Cout), K[u, v, c, (rh, rw, f)] =
    W[rh + (Jh - 1 - u) * sh, rw + (Jw - 1 - v) * sw, f, c] (zero past the kernel). Differentiable."""
    kh, kw, cout, cin = kernel.shape
    sh, sw = strides
    jh, jw = -(-kh // sh), -(-kw // sw)
    k = ops.pad(kernel, [(0, jh * sh - kh), (0, jw * sw - kw), (0, 0), (0, 0)])
    k = ops.reshape(k, (jh, sh, jw, sw, cout, cin))
    k = ops.flip(ops.flip(k, axis=0), axis=2)
    k = ops.transpose(k, (0, 2, 5, 1, 3, 4))  # (Jh, Jw, Cin, sh, sw, Cout)
    return ops.reshape(k, (jh, jw, cin, sh * sw * cout))


def phase_spec(spec: ConvSpec) -> ConvSpec:
    """The stride-1 VALID Conv2D the sub-pixel decomposition runs for a conv2d_transpose spec (on the padded
    input, channels_last): what its cost is estimated from."""
    geo = [phase_axis(k, s, d, spec.padding, None) for k, s, d in zip(spec.kernel, spec.strides, spec.dilation)]
    h = None if spec.height is None else spec.height + 2 * geo[0][1]
    w = None if spec.width is None else spec.width + 2 * geo[1][1]
    return ConvSpec(kind="conv2d", in_channels=spec.in_channels, filters=spec.strides[0] * spec.strides[1] * spec.filters,
                    kernel=(geo[0][0], geo[1][0]), height=h, width=w, batch=spec.batch,
                    dilation=spec.dilation if spec.strides == (1, 1) else (1, 1), padding="valid",
                    use_bias=False, dtype=spec.dtype)


def _has_zero_taps(kernel, strides) -> bool:
    return any(k % s for k, s in zip(kernel, strides))


def _dtype_max(dtype) -> float:
    return {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float64": 1.7976931348623157e308}.get(
        str(dtype), F32_MAX)


# ---- the layer -----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="convrewrite")
class SubpixelConv2DTranspose(keras.layers.Conv2DTranspose):
    """keras.layers.Conv2DTranspose computed as one stride-1 convolution with s*s*filters outputs plus
    depth_to_space (the sub-pixel decomposition, see the module doc).

    Takes every Conv2DTranspose argument and holds the same weights (kernel (kh, kw, filters, Cin), bias
    (filters,)), plus:
      method: "conv" (the stride-1 convolution through Keras's conv) or "fft" (through FFTs with a cached
        kernel spectrum, computed in float32; needs the spatial size at build, else it runs "conv").
    x: (batch, H, W, Cin) (or channels_first) -> the output Conv2DTranspose gives. Calls that the
    decomposition would not compute exactly as Keras (NaN/Inf meeting zero sub-kernel taps; for "fft" also
    values that could overflow the transforms) run Keras's own Conv2DTranspose computation.

    Raises:
        ValueError: an argument Conv2DTranspose refuses, or a method other than "conv" / "fft".

    Example:
        >>> up = SubpixelConv2DTranspose(32, 4, strides=2, padding="same")   # decoder upsampling
    """

    convrewrite_keras_class = keras.layers.Conv2DTranspose
    convrewrite_extra_config = ("method",)

    def __init__(self, *args, method="conv", **kwargs):
        super().__init__(*args, **kwargs)
        if method not in METHODS:
            raise ValueError(f"Received invalid method={method!r} for {type(self).__name__} '{self.name}'; "
                             f"expected one of {METHODS}.")
        self.method = method
        self._fft_layout = None
        self._spectrum_cache = None
        self._built_hw = (None, None)

    # -- geometry --
    def _axes_geometry(self):
        ops_ = self.output_padding or (None, None)
        return [phase_axis(k, s, d, self.padding, p)
                for k, s, d, p in zip(self.kernel_size, self.strides, self.dilation_rate, ops_)]

    def _conv_dilation(self):
        return tuple(self.dilation_rate) if tuple(self.strides) == (1, 1) else (1, 1)

    def _hw(self, shape):
        return (shape[2], shape[3]) if self.data_format == "channels_first" else (shape[1], shape[2])

    def _layout(self, h, w):
        """The FFT layout of the stride-1 VALID conv on the padded input, or None if the size is unknown."""
        if h is None or w is None:
            return None
        geo = self._axes_geometry()
        j_eff = [(g[0] - 1) * d + 1 for g, d in zip(geo, self._conv_dilation())]
        return choose_fft_layout(h + 2 * geo[0][1], w + 2 * geo[1][1], tuple(j_eff), (1, 1), "valid", "full")

    def build(self, input_shape):
        if undefined_output_padding(self.kernel_size, self.dilation_rate, self.padding, self.output_padding):
            raise ValueError(
                f"Received output_padding={self.output_padding} with padding='same' and kernel_size="
                f"{self.kernel_size} for {type(self).__name__} '{self.name}'; expected output_padding >= 1 where "
                f"the (dilated) kernel is even: the output would be one shorter than the input maps to (Keras's "
                f"Conv2DTranspose fails on it too).")
        super().build(input_shape)
        self._built_hw = tuple(self._hw(input_shape))
        if self.method == "fft":
            self._fft_layout = self._layout(*self._hw(input_shape))
            if self._fft_layout is not None:
                kh, kw = self.kernel_size
                cin = self.kernel.shape[-1]
                cout = self.strides[0] * self.strides[1] * self.filters
                shape = ((1, cout, self._fft_layout.bins) if cin == 1
                         else (self._fft_layout.bins, 1, 2 * cin, 2 * cout))
                self._spectrum_cache = backend.SpectrumCache(
                    (kh, kw, self.filters, cin), shape, "complex64" if cin == 1 else "float32",
                    name=f"{self.name}_spectrum_cache")

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """As FFTConv2D: the spectrum cache is derived state, kept out of checkpoints (see layers/fft.py)."""
        children = super()._trackable_children(save_type, **kwargs)
        if save_type != "savedmodel":
            children.pop("_spectrum_cache", None)
        return children

    # -- the computation --
    def call(self, inputs, training=None):
        h, w = self._hw(inputs.shape)
        layout = None
        if self.method == "fft":
            layout = self._fft_layout if (h, w) == self._built_hw else self._layout(h, w)
        if layout is not None:
            return self._fft_branch(inputs, layout, training)
        # A NaN/Inf kernel tap meets the zero padding of x (Keras never multiplies those pairs); a NaN/Inf input
        # meets the zero sub-kernel taps where k is not a multiple of s: both go to Keras's own computation.
        finite = backend.l2_norm(ops.cast(self.kernel, "float32"))
        if _has_zero_taps(self.kernel_size, self.strides):
            finite = finite * backend.l2_norm(ops.cast(inputs, "float32"))
        return guarded(self, inputs, ops.isfinite(finite),
                       lambda: self._subpixel(inputs, phase_kernel(self.kernel, self.strides), self.compute_dtype),
                       lambda t: super(SubpixelConv2DTranspose, self).call(t))

    def _fft_branch(self, inputs, layout, training):
        """The FFT result where it provably equals Keras's (the checks of layers/fft.py's `_fft_is_exact` on the
        padded stride-1 conv: finite, in range, not subnormal, float16-safe), else Keras's own call."""
        x = ops.cast(inputs, "float32")
        kernel, bias = float32_weights(self)
        cin = kernel.shape[-1]

        def compute(k):
            return kernel_spectrum(phase_kernel(k, self.strides), layout, 1, self._conv_dilation())

        def bound(k):  # the largest L1 norm of one output channel's taps (phases included)
            return ops.max(ops.sum(ops.abs(k), axis=(0, 1, 3)))

        cacheable = self._spectrum_cache is not None and layout.spectrum_key() == self._fft_layout.spectrum_key()
        if use_cached_transform(training, cacheable):
            read = float32_kernel_reader(lambda: float32_weights(self), ops.shape(kernel))
            spectrum, lip = backend.cached_transform(read, self._spectrum_cache, compute, aux=bound)
        else:
            spectrum, lip = compute(kernel), bound(kernel)
        scale = backend.l2_norm(x) * lip
        p, q = layout.fft_shape
        ok = ops.logical_and(scale < F32_MAX / 4 / float(p * q) ** 2, scale > 2.0 ** -40)
        compute_max = _dtype_max(self.compute_dtype)
        if compute_max < 1e30:  # float16: Keras's own sums saturate at 65504 where float32 ones do not
            m = ops.maximum(ops.max(x), -ops.min(x))
            out_bound = m * lip if bias is None else m * lip + ops.max(ops.abs(bias))
            ok = ops.logical_and(ok, out_bound < compute_max / 4)

        def fft():
            def conv(xp, _kernel):  # xp: (N, Hp, Wp, Cin) -> (N, A, B, s*s*Cout)
                y = spectral_correlate(ops.transpose(xp, (0, 3, 1, 2)), spectrum, layout, 1, cin)
                y = y[:, :, : layout.rows.span, : layout.cols.span]
                return ops.transpose(y, (0, 2, 3, 1))

            return self._subpixel(x, None, "float32", conv=conv, bias=bias)

        return guarded(self, inputs, ok, fft, lambda t: ops.cast(super(SubpixelConv2DTranspose, self).call(t),
                                                                 self.compute_dtype))

    def _subpixel(self, inputs, kernel, dtype, conv=None, bias=None):
        """The decomposition: pad, one stride-1 conv (`conv`, default Keras's), depth_to_space, crop, bias,
        activation. inputs in the layer's layout; returns the layer's output in `self.compute_dtype`."""
        x = ops.cast(inputs, dtype)
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        geo = self._axes_geometry()
        x = ops.pad(x, [(0, 0), (geo[0][1], geo[0][1]), (geo[1][1], geo[1][1]), (0, 0)])
        if conv is None:
            y = ops.conv(x, kernel, strides=1, padding="valid", dilation_rate=self._conv_dilation(),
                         data_format="channels_last")
        else:
            y = conv(x, kernel)
        sh, sw = self.strides
        if (sh, sw) != (1, 1):
            shape = ops.shape(y)
            y = ops.reshape(y, (shape[0], shape[1], shape[2], sh, sw, self.filters))
            y = ops.transpose(y, (0, 1, 3, 2, 4, 5))
            y = ops.reshape(y, (shape[0], shape[1] * sh, shape[2] * sw, self.filters))
        (_, _, pbh, cuth), (_, _, pbw, cutw) = geo
        if cuth < 0 or cutw < 0:  # output_padding reaching past the last scattered position: zeros there
            y = ops.pad(y, [(0, 0), (0, max(-cuth, 0)), (0, max(-cutw, 0)), (0, 0)])
            cuth, cutw = max(cuth, 0), max(cutw, 0)
        y = y[:, pbh: (-cuth or None), pbw: (-cutw or None), :]
        if self.use_bias:
            b = bias if bias is not None else ops.cast(self.bias, dtype)
            y = y + ops.reshape(b, (1, 1, 1, -1))
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        y = ops.cast(y, self.compute_dtype)
        return y if self.activation is None else self.activation(y)

    def get_config(self):
        return {**super().get_config(), "method": self.method}


# ---- registry entries ----------------------------------------------------------------------------
class TransposeSubpixelImplementation(Implementation):
    """Conv2DTranspose as one stride-1 Conv2D with s*s*filters outputs + depth_to_space (the sub-pixel
    decomposition): no zero-inserted input, TF's fast forward conv kernel instead of its backprop-input one."""

    name = "subpixel"
    description = "Conv2DTranspose as one stride-1 Conv2D with s*s*filters outputs + depth_to_space"
    layer_classes = (SubpixelConv2DTranspose,)
    simplicity = 12
    method = "conv"

    def applicable(self, spec: ConvSpec):
        if spec.kind != "conv2d_transpose":
            return False, f"kind {spec.kind} is not a transposed convolution"
        if max(spec.strides) > 1 and max(spec.dilation) > 1:
            return False, "strides > 1 with dilation > 1"  # Keras refuses it too
        if undefined_output_padding(spec.kernel, spec.dilation, spec.padding, spec.output_padding):
            return False, "output_padding 0 with SAME and an even kernel (Keras's own layer fails on it)"
        return True, ""

    def make_layer(self, layer, spec: ConvSpec, **options):
        self.check_options(options, {"method"})
        from ..graph import keras_config

        config = keras_config(layer)
        return SubpixelConv2DTranspose.from_config({**config, "method": options.get("method", self.method)})

    def options_of(self, layer):
        return {"method": layer.method}

    def features(self, spec: ConvSpec):
        """The stride-1 conv's MACs (zero sub-kernel taps included), its input and output, and the copies
        the decomposition adds (the padded input, the depth_to_space shuffle and the crop)."""
        conv = phase_spec(spec)
        b = spec.batch or 1
        ho, wo = conv.output_hw()
        n_in = b * (conv.height or 0) * (conv.width or 0) * spec.in_channels
        n_mid = b * (ho or 0) * (wo or 0) * conv.filters
        return {"macs": float(conv.macs() or 0), "bytes": 4.0 * (n_in + n_mid),
                "copy_bytes": 8.0 * (n_in + 2 * n_mid), "calls": 1.0}

    def workspace_bytes(self, spec: ConvSpec, options=None):
        f = self.features(spec)
        return float(io_bytes(spec)) + f["copy_bytes"] / 2.0


class TransposeFFTImplementation(TransposeSubpixelImplementation):
    """The sub-pixel decomposition's stride-1 convolution through FFTs (layers/fft.py's full-image transforms,
    kernel spectrum cached per weight state): for large kernels. Needs the spatial size at build."""

    name = "subpixel-fft"
    description = "Conv2DTranspose through the sub-pixel decomposition, its stride-1 conv by FFT"
    layer_classes = ()  # made by SubpixelConv2DTranspose too: `for_layer` names it subpixel
    simplicity = 22
    method = "fft"
    descriptive_features = frozenset({"fft_h", "fft_w", "matmul_m", "matmul_k", "matmul_n", "matmul_batch",
                                      "strided_waste", "flops", "macs"})

    def applicable(self, spec: ConvSpec):
        ok, why = super().applicable(spec)
        if not ok:
            return ok, why
        if "float64" in spec.dtype:
            return False, f"dtype {spec.dtype}: FFT layers compute in float32"
        if spec.height is None or spec.width is None:
            return False, "spatial size unknown at build; the full-image FFT needs it"
        return True, ""

    def cost_regime(self, spec: ConvSpec):
        return "dw" if spec.in_channels == 1 else "dense"

    def features(self, spec: ConvSpec):
        f = fft_cost_features(phase_spec(spec), "full")
        f["copy_bytes"] = TransposeSubpixelImplementation.features(self, spec)["copy_bytes"]
        return f

    def workspace_bytes(self, spec: ConvSpec, options=None):
        from .fft import FFTImplementation

        return FFTImplementation().workspace_bytes(phase_spec(spec))

    def expected_error(self, spec: ConvSpec):
        conv = phase_spec(spec)
        f = fft_cost_features(conv, "full")
        terms = math.log2(max(conv.kernel[0] * conv.kernel[1] * conv.in_channels, 2))
        return FFT_ERROR_SCALE * math.log2(max(f["fft_h"] * f["fft_w"], 2.0)) * min(terms, FFT_ERROR_TERMS_CAP)


register(TransposeSubpixelImplementation())
register(TransposeFFTImplementation())
