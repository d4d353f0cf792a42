"""Fuse an activation layer into the convolution before it: conv -> Activation(f) becomes conv(activation=f).

Pattern: a Keras conv layer (any of matching.conv_layout's, SeparableConv too: all apply `activation` to their
whole output) followed by `keras.layers.Activation`, by `keras.layers.ReLU` that is plain relu or relu6
(no threshold, no negative slope), or by a leaky ReLU with negative_slope 0.2 (`keras.layers.LeakyReLU`, or
`ReLU(negative_slope=0.2)` without max_value / threshold: both compute `backend.nn.leaky_relu(x, 0.2)`).

Why only those: the fused conv can only be given an activation by name (a lambda or partial would not survive
get_config / saving), and a named activation has fixed arguments: "relu6" is ReLU(max_value=6), and
"leaky_relu" is keras.activations.leaky_relu with its default negative_slope 0.2. LeakyReLU's own default is
0.3, so a LeakyReLU with any slope but 0.2 (and a ReLU with another max_value or a threshold) has no name that
computes it, and is left alone.

Exact (bit for bit: the conv layer applies the same function to the same tensor) when:
- the conv has no activation of its own, is called once, and nothing but the activation reads its output
  (the pre-activation is no model output);
- the activation layer is called once, with the conv's compute dtype.
"""

from __future__ import annotations

from . import matching as m
from .record import Rewrite

KIND = "fuse_activation"

LEAKY_RELU_SLOPE = 0.2
"""The negative slope of the named activation "leaky_relu" (keras.activations.leaky_relu's default)."""


def activation_of(layer):
    """The activation (a name or callable a conv's `activation=` accepts) `layer` applies, or None."""
    import keras

    if type(layer) is keras.layers.Activation:
        return layer.activation
    if type(layer) is keras.layers.ReLU and not layer.negative_slope and not layer.threshold:
        if layer.max_value is None:
            return "relu"
        if float(layer.max_value) == 6.0:
            return "relu6"
    if type(layer) is keras.layers.ReLU and layer.max_value is None and not layer.threshold:
        slope = layer.negative_slope  # nonzero here
        return "leaky_relu" if float(slope) == LEAKY_RELU_SLOPE else None
    if type(layer) is keras.layers.LeakyReLU and float(layer.negative_slope) == LEAKY_RELU_SLOPE:
        return "leaky_relu"
    return None


def _fusable_conv(layer) -> bool:
    import keras

    separable = type(layer) in (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
    return (separable or m.conv_layout(layer) is not None) and m.is_linear(layer)


def match(mg, key):
    """The activation node key fusing into conv node `key`, or None where the conditions above fail."""
    conv = m.op(mg, key)
    if not _fusable_conv(conv) or m.calls(mg, conv) != 1:
        return None
    act_key = m.sole_reader(mg, key)
    if act_key is None:
        return None
    act = m.op(mg, act_key)
    if activation_of(act) is None or m.calls(mg, act) != 1 or str(act.compute_dtype) != str(conv.compute_dtype):
        return None
    return act_key


def rewrite(mg):
    """({node key: replacement}, [Rewrite]) fusing every matching conv -> activation pair of graph `mg`."""
    replace, records = {}, []
    for key in mg.ordered_nodes():
        act_key = match(mg, key)
        if act_key is None:
            continue
        conv, act = m.op(mg, key), m.op(mg, act_key)
        call = m.new_conv(conv, conv.get_weights(), activation=activation_of(act))
        x, y = m.input_tensor(mg, key), m.output_tensor(mg, key)
        replace[key] = lambda tensor_of, call=call, x=x: call(tensor_of(x))
        replace[act_key] = lambda tensor_of, y=y: tensor_of(y)
        records.append(Rewrite.make(mg, KIND, conv.name, [conv.name, act.name], key, act_key))
    return replace, records
