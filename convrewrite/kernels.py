"""Keras's own kernels as implementations: `direct` (the layer itself, re-created) and `depthwise` (a
grouped Conv2D with one input channel per group, run through DepthwiseConv2D)."""

from __future__ import annotations

import numpy as np

from .graph import keras_config, recreate
from .registry import Implementation, canary_spec, register
from .spec import keras_class, separable_stages


DEPTHWISE_SLOW_WIDTHS = range(12, 14)
"""Kernel widths TensorFlow's CPU depthwise kernel runs about 2x slower than width 14 (Xeon 6/167/1, TF 2.21,
8x56x56x128: 13x13 31 ms, 13x14 14 ms; 12x12 27 ms, 12x14 14 ms): Direct's cost gets a term for them, and
`layers/wide.py` runs such kernels at width 14."""


class Direct(Implementation):
    """Keras's own layer (cuDNN on GPU, oneDNN on CPU), re-created from its config."""

    name = "direct"
    description = "Keras's own kernel (cuDNN on GPU, oneDNN/Eigen on CPU)"
    simplicity = 0

    def expected_error(self, spec):
        return 0.0  # it is the reference

    def applicable(self, spec):
        return True, ""

    def make_layer(self, layer, spec, **options):
        cls = keras_class(layer)
        if cls is not None and type(layer) is not cls:  # a replacement layer (e.g. FFT) back to Keras's own
            return cls.from_config(keras_config(layer))
        return recreate(layer)

    def canary_specs(self):
        # where CPUs differ most: a small dense conv (per-call overhead), a large dense kernel (oneDNN's
        # vector width: AVX-512 or not), depthwise, a grouped conv (TF's slow grouped path), 1x1 (GEMM)
        return [canary_spec(3, 32, 32, 48), canary_spec(15, 16, 16, 48), canary_spec(7, 64, 64, 56, depthwise=True),
                canary_spec(5, 32, 32, 32, groups=32), canary_spec(1, 128, 128, 28)]

    def features(self, spec):
        # Keras runs dense, grouped and depthwise convs through different kernels with very different
        # efficiency (TF's grouped Conv2D on CPU is 10-25x slower per MAC), so each gets its own term.
        # Per-MAC cost also grows when the channels per group are few (poor vectorization), so MACs
        # divided by input and by output channels per group get terms too (validated on held-out specs:
        # median relative error 39% -> 28%).
        if spec.kind == "separable_conv2d":  # TF runs it as its depthwise conv, then a dense 1x1 conv
            return _summed(self.features(stage) for stage in separable_stages(spec))
        f = super().features(spec)
        macs = f.pop("macs")
        # a transposed conv is the input gradient of a dense conv (TF's Conv2DBackpropInput): dense terms
        depthwise = spec.kind in ("depthwise_conv2d", "depthwise_conv1d")
        kind = "dw" if depthwise else ("grouped" if spec.groups > 1 else "dense")
        per_cin = macs / max(spec.in_channels // spec.groups, 1)
        per_cout = macs / max(spec.filters // spec.groups, 1)
        for k in ("dense", "grouped", "dw"):
            f[f"{k}_macs"] = macs if k == kind else 0.0
            f[f"{k}_macs_per_cin"] = per_cin if k == kind else 0.0
            f[f"{k}_macs_per_cout"] = per_cout if k == kind else 0.0
        # TF's depthwise kernel runs some kernel widths about 2x slower per MAC (see DEPTHWISE_SLOW_WIDTHS)
        f["dw_slow_width_macs"] = macs if kind == "dw" and spec.kernel[1] in DEPTHWISE_SLOW_WIDTHS else 0.0
        return f


def _summed(feature_dicts) -> dict:
    """Feature-wise sum of several stages' features, counted as one call."""
    out = {}
    for f in feature_dicts:
        for k, v in f.items():
            out[k] = out.get(k, 0.0) + v
    out["calls"] = 1.0
    return out


class Depthwise(Implementation):
    """A grouped Conv2D with one input channel per group, run through the depthwise kernel.

    Conv2D(groups=C) kernel (kh, kw, 1, C*M) holds output channel c*M + m of group c, which is exactly
    the order DepthwiseConv2D's (kh, kw, C, M) kernel produces, so the weights map by a reshape.
    """

    name = "depthwise"
    description = "grouped Conv2D with groups == in_channels through the depthwise kernel"
    simplicity = 10
    rule = "one channel per group runs through the depthwise kernel"  # 10-25x faster on CPU

    def applicable(self, spec):
        if spec.kind != "conv2d":
            return False, "already a depthwise layer" if spec.kind == "depthwise_conv2d" else f"kind {spec.kind}"
        if spec.groups == 1 or spec.groups != spec.in_channels:
            return False, f"groups={spec.groups} is not in_channels={spec.in_channels}"
        if max(spec.strides) > 1 and max(spec.dilation) > 1:
            return False, "depthwise kernel does not combine strides > 1 with dilation > 1"
        return True, ""

    def make_layer(self, layer, spec, **options):
        import keras

        config = layer.get_config()
        return keras.layers.DepthwiseConv2D(
            kernel_size=spec.kernel,
            strides=spec.strides,
            padding=spec.padding,
            depth_multiplier=spec.filters // spec.in_channels,
            data_format=spec.data_format,
            dilation_rate=spec.dilation,
            activation=layer.activation,  # the live callable: a lambda activation survives too
            use_bias=spec.use_bias,
            name=layer.name,
            dtype=config.get("dtype"),
            trainable=layer.trainable,
            depthwise_regularizer=config.get("kernel_regularizer"),
            bias_regularizer=config.get("bias_regularizer"),
            activity_regularizer=config.get("activity_regularizer"),
            depthwise_constraint=config.get("kernel_constraint"),
            bias_constraint=config.get("bias_constraint"),
        )

    def canary_specs(self):
        return [canary_spec(5, 32, 32, 32, groups=32)]

    def features(self, spec):
        f = super().features(spec)
        f["dw_macs"] = f.pop("macs")
        return f

    def transfer_weights(self, old_layer, new_layer, spec):
        weights = [np.array(w) for w in old_layer.get_weights()]
        kh, kw = spec.kernel
        weights[0] = weights[0].reshape(kh, kw, spec.in_channels, spec.filters // spec.in_channels)
        new_layer.set_weights(weights)


register(Direct())
register(Depthwise())
