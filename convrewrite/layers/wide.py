"""Depthwise convolution run at a wider kernel, where TensorFlow's depthwise kernel is fast.

TensorFlow's CPU depthwise kernel has a slow band of kernel *widths*: measured on Xeon 6/167/1 (TF 2.21,
8x56x56x128, SAME, medians of 5), widths 12-13 run about 2x slower than width 14 whatever the height
(13x13: 31 ms, 13x14: 14 ms; 12x12: 27 ms, 12x14: 14 ms; 27x13: 59 ms, 27x14: 26 ms), while widths 14..32
cost a smooth ~0.6 ms per column (widths 10-11 are 1.0-1.1x slower than 14, which the finiteness guard
below eats up, so they are left out). So a kh x kw kernel in that band is run as a kh x 14 kernel with zero
columns added: the same sums (a zero tap adds an exact zero), at the fast kernel's speed.

How a call runs (x: (batch, H, W, C), kernel (kh, kw, C, M) -> run kernel (rh, rw, C, M), rh >= kh, rw >= kw):
  * the kernel gets rh - kh zero rows and rw - kw zero columns, split before/after so that every real tap
    still reads the input position it reads in Keras's layer (see `axis_plan`);
  * where TF's own SAME padding for the run kernel puts exactly those extra zeros around the input (stride-1
    SAME, the common case), the run kernel is convolved SAME with no copy of the input; otherwise the input
    is zero-padded explicitly (Keras's padding plus the extra taps' reach) and convolved VALID;
  * bias and activation as Keras's DepthwiseConv2D.
An extra zero tap multiplies an input value no real tap of that output reads: where that value is NaN or Inf
the product is NaN, not Keras's result. So, like the FFT layers, a call whose input or kernel holds a NaN or Inf
(one reduction, ||x||_2 ||kernel||_2, decides) runs Keras's own computation instead.
"""

from __future__ import annotations

from typing import Optional, Tuple

import keras
from keras import ops

from ..kernels import DEPTHWISE_SLOW_WIDTHS, Depthwise
from ..registry import Implementation, canary_spec, io_bytes, register
from ..shapes import effective_length, pair, same_pads
from ..spec import ConvSpec
from . import backend
from .fft import guarded

__all__ = ["WideDepthwiseConv2D", "WideDepthwiseImplementation", "default_run_kernel", "axis_plan"]

SLOW_WIDTHS = DEPTHWISE_SLOW_WIDTHS
"""Kernel widths TensorFlow's CPU depthwise kernel runs slower than FAST_WIDTH (measured, see the module doc)."""
FAST_WIDTH = 14


def default_run_kernel(kernel: Tuple[int, int]) -> Tuple[int, int]:
    """The kernel size a (kh, kw) depthwise kernel runs at by default: width FAST_WIDTH when kw is in
    SLOW_WIDTHS, else unchanged (the implementation then does not apply)."""
    kh, kw = kernel
    return kh, (FAST_WIDTH if kw in SLOW_WIDTHS else kw)


def run_kernel_for(layer, run_kernel_size) -> Tuple[int, int]:
    """The kernel size `layer` (a depthwise-stage layer with `kernel_size`) runs at: `run_kernel_size`, or by
    default `default_run_kernel`; ValueError naming the layer where it is smaller than the kernel."""
    run = default_run_kernel(layer.kernel_size) if run_kernel_size is None else run_kernel_size
    run = pair(run, "run_kernel_size", f"{type(layer).__name__} '{layer.name}'")
    if any(r < k for r, k in zip(run, layer.kernel_size)):
        raise ValueError(f"Received invalid run_kernel_size={run} for {type(layer).__name__} '{layer.name}'; "
                         f"expected sizes >= kernel_size={tuple(layer.kernel_size)}.")
    return run


def axis_plan(size: Optional[int], kernel: int, run: int, dilation: int, stride: int, padding: str):
    """How one spatial axis of the wide convolution runs: (extra_before, (pad_before, pad_after), native), or
    None where that depends on a size unknown until run time (SAME with strides).

    Keras reads padded input positions i * stride + u * dilation, u < kernel, with its own pads (before, after)
    (SAME: `same_pads`; VALID: none). The run kernel holds the real taps at u + extra_before (zero taps
    around them, run - kernel in all), so it reads the same values from an input padded by
    (before + extra_before * dilation, after + extra_after * dilation), convolved VALID. tf_same: TF's own
    SAME padding for the run kernel is exactly that padding (always at stride 1, where SAME pads do not depend
    on the size), so the input need not be padded by hand.
    size: the input length along the axis (None: unknown).
    """
    extra = run - kernel
    if padding == "valid":
        return 0, (0, extra * dilation), extra == 0
    if stride != 1 and size is None:
        return None
    n = size if size is not None else 1  # at stride 1 the SAME pads do not depend on the size
    before, after = same_pads(n, effective_length(kernel, dilation), stride)
    run_before, run_after = same_pads(n, effective_length(run, dilation), stride)
    shift = run_before - before
    e = shift // dilation
    if shift % dilation == 0 and 0 <= e <= extra and run_after == after + (extra - e) * dilation:
        return e, (run_before, run_after), True
    return 0, (before, after + extra * dilation), False


class RunsWide:
    """What a layer running a depthwise stage at `run_kernel_size` shares (WideDepthwiseConv2D, the separable
    one): the argument, checked, and each spatial axis's `axis_plan` for an input shape."""

    def __init__(self, *args, run_kernel_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_kernel_size = run_kernel_for(self, run_kernel_size)

    def _axes(self):
        return (1, 2) if self.data_format == "channels_last" else (2, 3)

    def _plans(self, shape):
        return [axis_plan(shape[ax], k, r, d, s, self.padding) for ax, k, r, d, s in
                zip(self._axes(), self.kernel_size, self.run_kernel_size, self.dilation_rate, self.strides)]

    def _run_depthwise(self, inputs, plans, kernel):
        """The depthwise convolution of `inputs` with `kernel` (kh, kw, C, M) zero-padded to the run kernel,
        the input padded as `plans` say where the run kernel's own padding would not match Keras's."""
        kernel_pads = [(e, r - k - e) for (e, _, _), k, r in zip(plans, self.kernel_size, self.run_kernel_size)]
        kernel = ops.pad(kernel, kernel_pads + [(0, 0), (0, 0)])
        x, padding = inputs, self.padding
        if not all(native for _, _, native in plans):
            input_pads = [(0, 0)] * 4
            for ax, (_, pads, _) in zip(self._axes(), plans):
                input_pads[ax] = pads
            x, padding = ops.pad(inputs, input_pads), "valid"
        return ops.depthwise_conv(x, kernel, strides=self.strides, padding=padding, dilation_rate=self.dilation_rate,
                                  data_format=self.data_format)


@keras.saving.register_keras_serializable(package="convrewrite")
class WideDepthwiseConv2D(RunsWide, keras.layers.DepthwiseConv2D):
    """keras.layers.DepthwiseConv2D computed with its kernel zero-padded to `run_kernel_size`.

    Same arguments and weights as DepthwiseConv2D (kernel (kh, kw, C, M), bias (C * M,)), plus:
      run_kernel_size: int or (rh, rw) >= kernel_size, the kernel size TensorFlow's depthwise kernel runs at
        (None: `default_run_kernel(kernel_size)`).
    x: (batch, H, W, C) (or channels_first) -> (batch, H', W', C * M), as Keras. Calls whose input or kernel
    holds NaN/Inf run Keras's own computation (see the module doc).

    Raises:
        ValueError: an argument DepthwiseConv2D refuses, or a run_kernel_size smaller than kernel_size.

    Example:
        >>> layer = WideDepthwiseConv2D(13, padding="same")     # runs as 13x14 on TensorFlow's fast path
    """

    convrewrite_keras_class = keras.layers.DepthwiseConv2D
    convrewrite_extra_config = ("run_kernel_size",)


    def call(self, inputs):
        """The wide kernel's result where it provably equals Keras's (finite input and kernel), else Keras's."""
        plans = self._plans(inputs.shape)
        if any(p is None for p in plans) or self._smaller_than_kernel(inputs.shape):
            return super().call(inputs)  # Keras's own handling (an error for a too-small VALID input)
        finite = ops.isfinite(backend.l2_norm(ops.cast(inputs, "float32"))
                              * backend.l2_norm(ops.cast(self.kernel, "float32")))
        return guarded(self, inputs, finite, lambda: self._wide_call(inputs, plans),
                       lambda t: super(WideDepthwiseConv2D, self).call(t))

    def _smaller_than_kernel(self, shape):
        if self.padding != "valid":
            return False
        return any(shape[ax] is not None and shape[ax] < effective_length(k, d)
                   for ax, k, d in zip(self._axes(), self.kernel_size, self.dilation_rate))

    def _wide_call(self, inputs, plans):
        """The run kernel's convolution (see `axis_plan`), then bias and activation as Keras's layer."""
        outputs = self._run_depthwise(inputs, plans, self.kernel)
        if self.use_bias:
            shape = (1, 1, 1, -1) if self.data_format == "channels_last" else (1, -1, 1, 1)
            outputs = ops.add(outputs, ops.reshape(self.bias, shape))
        return outputs if self.activation is None else self.activation(outputs)

    def get_config(self):
        return {**super().get_config(), "run_kernel_size": list(self.run_kernel_size)}


# ---- registry entry -------------------------------------------------------------------------------
class WideDepthwiseImplementation(Implementation):
    """Depthwise convs (DepthwiseConv2D, or Conv2D with one input channel per group) whose kernel width is in
    TensorFlow's slow band, run at a wider kernel with zero taps (option run_kernel_size; default
    `default_run_kernel`). Exact: the same sums, NaN/Inf calls through Keras's own kernel."""

    name = "depthwise-wide"
    description = "depthwise kernel zero-padded to a width TensorFlow's depthwise kernel runs fast"
    layer_classes = (WideDepthwiseConv2D,)
    simplicity = 15

    def applicable(self, spec: ConvSpec):
        if spec.kind == "conv2d":
            ok, why = Depthwise().applicable(spec)
            if not ok:
                return False, why
        elif spec.kind != "depthwise_conv2d":
            return False, f"kind {spec.kind} is not a depthwise convolution"
        if default_run_kernel(spec.kernel) == tuple(spec.kernel):
            return False, f"kernel width {spec.kernel[1]} is outside the slow band {SLOW_WIDTHS.start}..{SLOW_WIDTHS.stop - 1}"
        if spec.padding == "same" and max(spec.strides) > 1 and (spec.height is None or spec.width is None):
            return False, "SAME padding with strides needs the spatial size at build"
        return True, ""

    def make_layer(self, layer, spec: ConvSpec, **options):
        self.check_options(options, {"run_kernel_size"})
        from ..graph import keras_config

        base = Depthwise().make_layer(layer, spec) if spec.kind == "conv2d" else layer
        run = options.get("run_kernel_size") or default_run_kernel(spec.kernel)
        return WideDepthwiseConv2D.from_config({**keras_config(base), "run_kernel_size": run})

    def transfer_weights(self, old_layer, new_layer, spec):
        Depthwise().transfer_weights(old_layer, new_layer, spec)  # a reshape, the identity for depthwise

    def options_of(self, layer):
        return {"run_kernel_size": tuple(layer.run_kernel_size)}

    def canary_specs(self):
        return [canary_spec(13, 64, 64, 56, depthwise=True)]

    def features(self, spec: ConvSpec, **options):
        """MACs at the run kernel (zero taps cost like real ones), activations, and the input copy made where
        the input is padded by hand (VALID, or SAME with strides that TF pads differently)."""
        f = super().features(spec)
        rh, rw = options.get("run_kernel_size") or default_run_kernel(spec.kernel)
        kh, kw = spec.kernel
        f["dw_macs"] = f.pop("macs") * (rh * rw) / (kh * kw)
        plans = [axis_plan(n, k, r, d, s, spec.padding) for n, k, r, d, s in
                 zip((spec.height, spec.width), spec.kernel, (rh, rw), spec.dilation, spec.strides)]
        native = all(p is not None and p[2] for p in plans)
        n_in = (spec.batch or 1) * (spec.height or 0) * (spec.width or 0) * spec.in_channels
        f["copy_bytes"] = 0.0 if native else 8.0 * n_in
        return f

    def workspace_bytes(self, spec: ConvSpec, options=None):
        """Input, output and weights, plus a padded copy of the input where it is padded by hand."""
        return float(io_bytes(spec)) + self.features(spec, **(options or {}))["copy_bytes"] / 2.0


register(WideDepthwiseImplementation())
