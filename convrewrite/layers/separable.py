"""SeparableConv2D with its depthwise stage through the faster depthwise paths, then Keras's pointwise stage.

Keras's SeparableConv2D is a depthwise convolution (kernel (kh, kw, C, M): C*M channels) followed by a 1x1
convolution to `filters` channels, then bias and activation. The depthwise stage is where large kernels cost:
  * `FFTSeparableConv2D` runs it through layers/fft.py's FFT machinery (full image or overlap-save tiles,
    cached kernel spectrum, the same guard that sends NaN/Inf or overflowing inputs through Keras's own
    computation: see `_FFTConvMixin._fft_is_exact`);
  * `WideSeparableConv2D` runs it at a wider kernel with zero taps where TensorFlow's depthwise kernel is slow
    (widths 12-13, see layers/wide.py; NaN/Inf calls through Keras's own computation).
The pointwise stage then runs as Keras runs it (a 1x1 conv in the compute dtype), bias and activation after.
Both layers subclass SeparableConv2D and hold its weights (depthwise_kernel (kh, kw, C, M), pointwise_kernel
(1, 1, C*M, filters), bias (filters,)), so they are drop-in: they also replace convs held in custom layers.

x: (batch, H, W, C) or channels_first -> (batch, Ho, Wo, filters) as SeparableConv2D.
"""

from __future__ import annotations

import keras
from keras import ops

from .. import keras_internals
from ..registry import Implementation, io_bytes, register
from ..shapes import effective_length
from ..spec import ConvSpec, separable_stages
from . import backend
from .fft import FFTImplementation, FFTTiledImplementation, _FFTConvMixin, fft_cost_features, guarded
from .wide import SLOW_WIDTHS, RunsWide, default_run_kernel

__all__ = ["FFTSeparableConv2D", "WideSeparableConv2D", "SeparableFFTImplementation",
           "SeparableFFTTiledImplementation", "SeparableWideImplementation", "separable_stages"]


class _PointwiseMixin:
    """The pointwise stage, bias and activation after a depthwise result, as SeparableConv2D computes them."""

    def _pointwise(self, y):
        y = ops.cast(y, self.compute_dtype)
        y = ops.conv(y, self.pointwise_kernel, strides=1, padding="valid", data_format=self.data_format)
        if self.use_bias:
            # `+`, not keras.ops.add: TF's ops.add turns a (1, C, 1, 1) addend into an NHWC bias_add when the
            # last axis also has C entries (channels_first with width == filters), adding along the wrong axis
            shape = (1, 1, 1, -1) if self.data_format == "channels_last" else (1, -1, 1, 1)
            y = y + ops.reshape(ops.cast(self.bias, y.dtype), shape)
        return y if self.activation is None else self.activation(y)


@keras.saving.register_keras_serializable(package="convrewrite")
class FFTSeparableConv2D(_PointwiseMixin, _FFTConvMixin, keras.layers.SeparableConv2D):
    """keras.layers.SeparableConv2D with its depthwise stage computed through FFTs (cached kernel spectra).

    Takes every SeparableConv2D argument and holds the same weights, plus `tile_size` as FFTConv2D (None:
    automatic, "full", or an output tile). The depthwise stage computes in float32 under any policy, the
    pointwise stage in the compute dtype, as Keras's.

    Raises:
        ValueError: an argument SeparableConv2D refuses, or a bad tile_size.

    Example:
        >>> layer = FFTSeparableConv2D(128, 31, padding="same")   # a 31x31 separable conv, depthwise by FFT
    """

    convrewrite_keras_class = keras.layers.SeparableConv2D
    convrewrite_extra_config = ("tile_size",)

    def __init__(self, *args, tile_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fft(tile_size)

    def _grouping(self):
        c, m = self.depthwise_kernel.shape[2], self.depthwise_kernel.shape[3]
        return c, 1, c * m

    def _float32_weights(self):
        """The depthwise kernel (what the transforms use); the bias is added after the pointwise stage."""
        with keras_internals.autocast_disabled():
            return ops.cast(self.depthwise_kernel, "float32"), None

    def _fft_call(self, x, spectrum, bias, layout):
        groups, cg, _ = self._grouping()
        y = self._tiled(x, spectrum, layout, groups, cg) if layout.tiled else self._full(x, spectrum, layout, groups, cg)
        return self._pointwise(y)


@keras.saving.register_keras_serializable(package="convrewrite")
class WideSeparableConv2D(RunsWide, _PointwiseMixin, keras.layers.SeparableConv2D):
    """keras.layers.SeparableConv2D with its depthwise kernel zero-padded to `run_kernel_size` (see
    layers/wide.py: TensorFlow's depthwise kernel runs widths 12-13 about 2x slower than width 14).

    Same arguments and weights as SeparableConv2D, plus run_kernel_size: int or (rh, rw) >= kernel_size
    (None: `wide.default_run_kernel(kernel_size)`). Calls whose input or depthwise kernel holds NaN/Inf run
    Keras's own computation.

    Raises:
        ValueError: an argument SeparableConv2D refuses, or a run_kernel_size smaller than kernel_size.
    """

    convrewrite_keras_class = keras.layers.SeparableConv2D
    convrewrite_extra_config = ("run_kernel_size",)

    def call(self, inputs):
        plans = self._plans(inputs.shape)
        small = self.padding == "valid" and any(
            inputs.shape[ax] is not None and inputs.shape[ax] < effective_length(k, d)
            for ax, k, d in zip(self._axes(), self.kernel_size, self.dilation_rate))
        if any(p is None for p in plans) or small:
            return super().call(inputs)  # Keras's own handling
        finite = ops.isfinite(backend.l2_norm(ops.cast(inputs, "float32"))
                              * backend.l2_norm(ops.cast(self.depthwise_kernel, "float32")))
        return guarded(self, inputs, finite, lambda: self._wide_call(inputs, plans),
                       lambda t: super(WideSeparableConv2D, self).call(t))

    def _wide_call(self, inputs, plans):
        y = self._run_depthwise(inputs, plans, self.depthwise_kernel)
        return self._pointwise(y)

    def get_config(self):
        return {**super().get_config(), "run_kernel_size": list(self.run_kernel_size)}


# ---- registry entries -----------------------------------------------------------------------------
def _pointwise_features(spec: ConvSpec) -> dict:
    """The pointwise stage's cost terms (a dense 1x1 conv): MACs and the bytes it moves."""
    _, pw = separable_stages(spec)
    n = (pw.batch or 1) * (pw.height or 0) * (pw.width or 0)
    return {"pw_macs": float(pw.macs() or 0), "pw_bytes": 4.0 * n * (pw.in_channels + pw.filters)}


class SeparableFFTImplementation(Implementation):
    """SeparableConv2D with its depthwise stage by full-image FFT, then Keras's pointwise stage. The depthwise
    stage is answered for by `stage` (the FFT implementation of DepthwiseConv2D) on `separable_stages`' spec."""

    name = "sep-fft"
    description = "SeparableConv2D: depthwise stage by full-image FFT (cached spectra), pointwise as Keras"
    layer_classes = (FFTSeparableConv2D,)
    simplicity = 21
    stage = FFTImplementation()
    descriptive_features = FFTImplementation.descriptive_features

    def applicable(self, spec: ConvSpec):
        if spec.kind != "separable_conv2d":
            return False, f"kind {spec.kind} is not a separable convolution"
        return self.stage.applicable(separable_stages(spec)[0])

    def _tile(self, spec, options):
        dw = separable_stages(spec)[0]
        return self.stage._resolve(dw, options) if hasattr(self.stage, "_resolve") else self.stage._tile(options)

    def make_layer(self, layer, spec: ConvSpec, **options):
        self.check_options(options, {"tile_size"})
        from ..graph import keras_config

        config = keras_config(layer)
        return FFTSeparableConv2D.from_config({**config, "tile_size": self._tile(spec, options)})

    def options_of(self, layer):
        return {"tile_size": layer.tile_size}

    def features(self, spec: ConvSpec, **options):
        f = fft_cost_features(separable_stages(spec)[0], self._tile(spec, options))
        return {**f, **_pointwise_features(spec)}

    def workspace_bytes(self, spec: ConvSpec, options=None):
        dw, pw = separable_stages(spec)
        need = self.stage.workspace_bytes(dw, options)
        return None if need is None else need + io_bytes(pw)

    def expected_error(self, spec: ConvSpec):
        dw, pw = separable_stages(spec)
        return self.stage.expected_error(dw) + Implementation.expected_error(self, pw)


class SeparableFFTTiledImplementation(SeparableFFTImplementation):
    """SeparableConv2D with its depthwise stage by overlap-save tiled FFT (any input size)."""

    name = "sep-fft-tiled"
    description = "SeparableConv2D: depthwise stage by overlap-save tiled FFT, pointwise as Keras"
    layer_classes = ()
    simplicity = 31
    stage = FFTTiledImplementation()


class SeparableWideImplementation(Implementation):
    """SeparableConv2D whose depthwise kernel width is in TensorFlow's slow band, run at width 14."""

    name = "sep-wide"
    description = "SeparableConv2D: depthwise kernel zero-padded to a width TF's depthwise kernel runs fast"
    layer_classes = (WideSeparableConv2D,)
    simplicity = 16

    def applicable(self, spec: ConvSpec):
        if spec.kind != "separable_conv2d":
            return False, f"kind {spec.kind} is not a separable convolution"
        if default_run_kernel(spec.kernel) == tuple(spec.kernel):
            return False, (f"kernel width {spec.kernel[1]} is outside the slow band "
                           f"{SLOW_WIDTHS.start}..{SLOW_WIDTHS.stop - 1}")
        if spec.padding == "same" and max(spec.strides) > 1 and (spec.height is None or spec.width is None):
            return False, "SAME padding with strides needs the spatial size at build"
        return True, ""

    def make_layer(self, layer, spec: ConvSpec, **options):
        self.check_options(options, {"run_kernel_size"})
        from ..graph import keras_config

        config = keras_config(layer)
        run = options.get("run_kernel_size") or default_run_kernel(spec.kernel)
        return WideSeparableConv2D.from_config({**config, "run_kernel_size": run})

    def options_of(self, layer):
        return {"run_kernel_size": tuple(layer.run_kernel_size)}

    def features(self, spec: ConvSpec, **options):
        """The depthwise stage's MACs at the run kernel, plus the pointwise stage's terms."""
        f = super().features(separable_stages(spec)[0])
        rh, rw = options.get("run_kernel_size") or default_run_kernel(spec.kernel)
        f["dw_macs"] = f.pop("macs") * (rh * rw) / (spec.kernel[0] * spec.kernel[1])
        return {**f, **_pointwise_features(spec)}


register(SeparableFFTImplementation())
register(SeparableFFTTiledImplementation())
register(SeparableWideImplementation())
