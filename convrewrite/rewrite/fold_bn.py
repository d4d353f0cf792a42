"""Fold a BatchNormalization into the convolution before it.

Pattern: conv -> BatchNormalization, where conv is Keras's own Conv1D/2D/3D (grouped too),
DepthwiseConv1D/2D or Conv1D/2D/3DTranspose.

Exact (to float rounding) when:
- the BN runs on its moving statistics: not called with training=True, no mask (then BN(y) = s*y + t per
  channel, s = gamma/sqrt(var+eps), t = beta - mean*s; scale=False / center=False mean gamma=1 / beta=0);
- the BN normalizes exactly the conv's channel axis (any `axis` spelling, either data_format);
- nothing else reads the conv's output (it is no model output either) and conv and BN are each called once,
  so no other use sees the scaled kernel;
- the conv has no activation (BN after a nonlinearity is not affine in the conv's output);
- both compute and store float32 (or float64): in half precision the folded kernel rounds differently.
Then conv'(x) = conv(x) * s + t with kernel' = kernel * s on the output-channel axis and bias' = bias*s + t.

Inference only: the folded model has no BN to update, so training it is not training the original
(optimize(mode="training") skips this stage).
"""

from __future__ import annotations

from . import kernels, matching as m
from .record import Rewrite

KIND = "fold_bn"


def match(mg, key):
    """The BN node key folding into conv node `key`, or None where the conditions above fail."""
    conv = m.op(mg, key)
    layout = m.conv_layout(conv)
    if layout is None or not m.is_linear(conv) or m.calls(mg, conv) != 1:
        return None
    bn_key = m.sole_reader(mg, key)
    if bn_key is None or not m.inference_bn(mg, bn_key):
        return None
    bn = m.op(mg, bn_key)
    rank = len(m.output_tensor(mg, key).shape)
    if not m.bn_channel_axis_ok(bn, rank, conv.data_format) or not m.same_float_dtype(conv, bn):
        return None
    return bn_key


def rewrite(mg):
    """({node key: replacement}, [Rewrite]) folding every matching conv -> BN pair of graph `mg`."""
    replace, records = {}, []
    for key in mg.ordered_nodes():
        if key in replace:
            continue
        bn_key = match(mg, key)
        if bn_key is None:
            continue
        conv, bn = m.op(mg, key), m.op(mg, bn_key)
        kernel, bias = m.conv_weights(conv)
        s, t = m.bn_affine(bn)
        call = m.new_conv(conv, kernels.fold(kernel, bias, s, t, m.conv_layout(conv)), use_bias=True)
        x, y = m.input_tensor(mg, key), m.output_tensor(mg, key)
        replace[key] = lambda tensor_of, call=call, x=x: call(tensor_of(x))
        replace[bn_key] = lambda tensor_of, y=y: tensor_of(y)  # the folded conv's output passes through
        records.append(Rewrite.make(mg, KIND, conv.name, [conv.name, bn.name], key, bn_key))
    return replace, records
