"""The registry of convolution implementations.

Each implementation says which ConvSpecs it applies to, builds its Keras layer from the original layer
plus spec, moves the original's weights into it, and exposes the features a cost model needs.
Adding an implementation means: one layer file under `convrewrite/layers/` and one `register(...)` here.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from .errors import PlanError
from .spec import ConvSpec

_REGISTRY: Dict[str, "Implementation"] = {}


class Implementation:
    """Base class. Subclasses set `name`/`description` and override what differs."""

    name: str = ""
    description: str = ""
    layer_classes: tuple = ()  # classes of the layers make_layer returns that only this implementation makes
    descriptive_features: frozenset = frozenset()  # features that describe sizes/ratios, not costs: not regressed on

    def applicable(self, spec: ConvSpec) -> Tuple[bool, str]:
        """(True, "") if this implementation computes `spec` exactly, else (False, why not)."""
        raise NotImplementedError

    def make_layer(self, layer, spec: ConvSpec, **options):
        """A new, unbuilt Keras layer computing what `layer` computes, named like it."""
        raise NotImplementedError

    def transfer_weights(self, old_layer, new_layer, spec: ConvSpec) -> None:
        """Copy `old_layer`'s weights into the built `new_layer` (values, never shared variables)."""
        new_layer.set_weights([np.array(w) for w in old_layer.get_weights()])

    def dependencies(self, spec: ConvSpec, options: dict):
        """Names of model inputs / layers whose outputs `call` needs besides the site's own input.

        The rebuild orders the graph so these are computed first (e.g. PAC's guidance)."""
        return []

    def call(self, new_layer, args, kwargs, context):
        """Call `new_layer` in the rebuilt graph where the original layer was called with (args, kwargs).

        context.resolve(name) returns the rebuilt symbolic tensor of a model input or of a layer's
        output (its first call); context.site is the Site being replaced, context.options its options."""
        return new_layer(*args, **kwargs)

    def probe_call(self, new_layer, x):
        """Call the replacement on a lone input tensor `x` for per-site verification.

        Implementations that take extra inputs (guidance) feed random ones here: at conversion their
        output must not depend on them."""
        return new_layer(x)

    def cost_regime(self, spec: ConvSpec) -> str:
        """A label for specs this implementation runs through different code (e.g. 'dw' vs 'dense'): the cost
        model fits each regime's terms separately. '' means one regime."""
        return ""

    def features(self, spec: ConvSpec) -> Dict[str, float]:
        """Numbers the cost model regresses time on. Must not depend on anything but the spec."""
        macs = spec.macs() or 0
        n_in = (spec.batch or 1) * (spec.height or 0) * (spec.width or 0) * spec.in_channels
        ho, wo = spec.output_hw()
        n_out = (spec.batch or 1) * (ho or 0) * (wo or 0) * spec.filters
        return {"macs": float(macs), "bytes": 4.0 * (n_in + n_out), "calls": 1.0}

    def __repr__(self):
        return f"<Implementation {self.name}>"


def register(impl: Implementation) -> Implementation:
    """Add an implementation to the registry (replacing one of the same name)."""
    if not impl.name:
        raise ValueError("Received an implementation without a name; expected a non-empty `name`.")
    _REGISTRY[impl.name] = impl
    return impl


def get(name: str) -> Implementation:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PlanError(f"Unknown implementation {name!r}; expected one of {sorted(_REGISTRY)}.") from None


def names():
    return list(_REGISTRY)


def for_layer(layer) -> Implementation:
    """The implementation that made `layer` (by its class), `direct` for Keras's own layers."""
    for impl in _REGISTRY.values():
        if impl.layer_classes and isinstance(layer, impl.layer_classes):
            return impl
    return _REGISTRY["direct"]


def candidates(spec: ConvSpec, allowed=None):
    """{name: (applicable, reason)} for every registered implementation (filtered by `allowed`)."""
    out = {}
    for name, impl in _REGISTRY.items():
        if allowed is not None and name not in allowed:
            continue
        out[name] = impl.applicable(spec)
    return out


# ---- built-in implementations -------------------------------------------------------------------
class Direct(Implementation):
    """Keras's own layer (cuDNN on GPU, oneDNN on CPU), re-created from its config."""

    name = "direct"
    description = "Keras's own kernel (cuDNN on GPU, oneDNN/Eigen on CPU)"

    def applicable(self, spec):
        return True, ""

    def make_layer(self, layer, spec, **options):
        from .graph import live_config, recreate
        from .spec import keras_class

        cls = keras_class(layer)
        if cls is not None and type(layer) is not cls:  # a replacement layer (e.g. FFT) back to Keras's own
            extra = type(layer).__dict__.get("convrewrite_extra_config", ())
            return cls.from_config({k: v for k, v in live_config(layer).items() if k not in extra})
        return recreate(layer)

    def features(self, spec):
        # Keras runs dense, grouped and depthwise convs through different kernels with very different
        # efficiency (TF's grouped Conv2D on CPU is 10-25x slower per MAC), so each gets its own term.
        # Per-MAC cost also grows when the channels per group are few (poor vectorization), so MACs
        # divided by input and by output channels per group get terms too (validated on held-out specs:
        # median relative error 39% -> 28%).
        f = super().features(spec)
        macs = f.pop("macs")
        kind = "dw" if spec.kind == "depthwise_conv2d" else ("grouped" if spec.groups > 1 else "dense")
        per_cin = macs / max(spec.in_channels // spec.groups, 1)
        per_cout = macs / max(spec.filters // spec.groups, 1)
        for k in ("dense", "grouped", "dw"):
            f[f"{k}_macs"] = macs if k == kind else 0.0
            f[f"{k}_macs_per_cin"] = per_cin if k == kind else 0.0
            f[f"{k}_macs_per_cout"] = per_cout if k == kind else 0.0
        return f


class Depthwise(Implementation):
    """A grouped Conv2D with one input channel per group, run through the depthwise kernel.

    Conv2D(groups=C) kernel (kh, kw, 1, C*M) holds output channel c*M + m of group c, which is exactly
    the order DepthwiseConv2D's (kh, kw, C, M) kernel produces, so the weights map by a reshape.
    """

    name = "depthwise"
    description = "grouped Conv2D with groups == in_channels through the depthwise kernel"

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

# ---- implementations defined next to their layers (one line each) -----------------------------
from .layers import fft as _fft  # noqa: E402

register(_fft.FFTImplementation())
register(_fft.FFTTiledImplementation())

# ---- PAC (convrewrite/layers/pac.py) ----
from .layers import pac as _pac  # noqa: E402

register(_pac.PacImplementation())
