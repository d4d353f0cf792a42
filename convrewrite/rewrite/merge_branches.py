"""Merge parallel convolutions on one input, summed by an Add, into one convolution (RepVGG, RepLKNet).

Pattern: Add([b1(x), b2(x), ...]), or a functional sum b1(x) + b2(x) / keras.ops.add(b1(x), b2(x)) (an ops node
of two tensors, no Add layer; a sum of three, (b1 + b2) + b3, merges in two rounds), where every branch is one of
- a conv on x: Keras's own Conv1D/Conv2D (grouped too) or DepthwiseConv2D (a conv -> BN branch is one after
  fold_bn ran);
- an identity: x itself, or a BatchNormalization of x (RepVGG's identity branch),
and at least one branch is a conv.

Exact (to float rounding) when:
- every conv branch has the same class, data_format, filters, groups / depth_multiplier and strides, no
  activation, is called once and only the Add reads it; the Add is called once and reads only branches;
- every kernel is zero-padded to the largest size K per axis, its taps where the merged window reads what
  the branch read: with padding='same', TF pads the merged conv by padding_before(K) and the branch by
  padding_before(k) before the data, so the branch starts padding_before(K) - padding_before(k) into the
  window (centred at stride 1 with odd sizes; at stride 2 on an even input TF pads a 3x3 by 0 before and 1
  after, so a 1x1 sits at the window's first tap), which must lie in [0, K - k]; at stride > 1 the input size
  must be known; with padding='valid' all kernels have one size (1x1 kernels are alike under either padding);
- a dilated branch (rate d) is replaced by its dense kernel ((k-1)d+1 taps, zeros between) only where that is
  no larger than the largest undilated kernel, so merging never grows the conv;
- an identity branch needs stride 1, as many filters as input channels (depth_multiplier 1) and 'same'
  padding (or K = 1): it becomes a kernel with a 1 at the centre tap of each channel's own input, its BN
  (inference, one call, channel axis) folded in as in fold_bn;
- everything is float32 (or float64).
Then the merged kernel is the sum of the centred kernels and the bias the sum of the biases.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import kernels, matching as m
from .record import Rewrite

KIND = "merge_branches"


def _branch(mg, add_key, position):
    """('conv', key) / ('bn', key) / ('identity', None) for the Add's input `position`, or None where that
    input is a conv or BN that cannot be merged."""
    import keras

    key = m.producer_key(mg, add_key, position)
    layer = m.op(mg, key)
    if type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
        ok = m.is_linear(layer) and m.calls(mg, layer) == 1 and m.sole_reader(mg, key) == add_key
        return ("conv", key) if ok else None
    if type(layer) is keras.layers.BatchNormalization and m.inference_bn(mg, key) and m.sole_reader(mg, key) == add_key:
        return "bn", key
    return "identity", None


def _branches(mg, add_key):
    """([(kind, key)] for every input of the Add, the shared input tensor x), or None where an input is no
    branch of x or no branch is a conv."""
    n = len(mg.graph.nodes[add_key]["node"].input_tensors)
    found = [_branch(mg, add_key, i) for i in range(n)]
    if None in found or n < 2 or not any(kind == "conv" for kind, _ in found):
        return None
    x = m.input_tensor(mg, next(key for kind, key in found if kind == "conv"))
    for i, (kind, key) in enumerate(found):
        if (m.input_tensor(mg, add_key, i) if kind == "identity" else m.input_tensor(mg, key)) is not x:
            return None
    return found, x


def _same_setup(layers) -> bool:
    """Every conv branch computes the same kind of conv apart from its kernel size and dilation."""
    def setup(layer):
        cfg = layer.get_config()
        return (type(layer), cfg.get("data_format"), cfg.get("filters"), cfg.get("groups", 1),
                cfg.get("depth_multiplier"), tuple(cfg["strides"]), layer.compute_dtype, layer.variable_dtype)
    return len({setup(layer) for layer in layers}) == 1 and m.same_float_dtype(*layers)


def _dense_sizes(layers):
    """Per conv branch, its kernel's dense size per axis (dilation expanded); None where a dilated one would
    be larger than the largest undilated kernel."""
    plain = [tuple(layer.kernel_size) for layer in layers if all(d == 1 for d in layer.dilation_rate)]
    if not plain:
        return None
    largest = tuple(max(k[i] for k in plain) for i in range(len(plain[0])))
    sizes = [tuple((k - 1) * d + 1 for k, d in zip(layer.kernel_size, layer.dilation_rate)) for layer in layers]
    return sizes if all(s <= b for size in sizes for s, b in zip(size, largest)) else None


def _spatial(x, data_format, rank):
    shape = tuple(x.shape)
    return shape[2:2 + rank] if data_format == "channels_first" else shape[1:1 + rank]


def _offset(n, K: int, k: int, s: int, padding: str):
    """Where a branch kernel of size k starts inside the merged size K on one axis (input size n, stride s),
    or None where no placement is exact. TF pads 'same' by same_padding_before(n, K, s) before the data for
    the merged conv and by same_padding_before(n, k, s) for the branch, so the branch's taps start that
    difference into the merged window (at stride 1, (K-1)//2 - (k-1)//2 whatever n); 'valid' pads nothing."""
    if padding == "valid":
        return 0 if K == k else None
    if s == 1:
        offset = (K - 1) // 2 - (k - 1) // 2
    elif n is None:
        return None
    else:
        offset = kernels.same_padding_before(n, K, s) - kernels.same_padding_before(n, k, s)
    return offset if 0 <= offset <= K - k else None


def _offsets(layers, sizes, merged, padding, spatial, has_identity):
    """[offsets per axis] for every conv branch, then (if `has_identity`) for the identity's 1-tap kernel,
    or None where a branch has no exact place (identities need stride 1)."""
    strides = tuple(layers[0].strides)
    if has_identity and any(s != 1 for s in strides):
        return None
    out = []
    for size in list(sizes) + ([(1,) * len(merged)] if has_identity else []):
        offsets = [_offset(n, K, k, s, padding) for n, K, k, s in zip(spatial, merged, size, strides)]
        if None in offsets:
            return None
        out.append(tuple(offsets))
    return out


def _padding(layers, sizes) -> Optional[str]:
    """The merged conv's padding: the one every kernel larger than 1 uses ('same' or 'valid')."""
    found = {layer.padding for layer, size in zip(layers, sizes) if any(k > 1 for k in size)}
    if not found:
        return "valid"
    return found.pop() if len(found) == 1 and found <= {"same", "valid"} else None


def _channels(x, data_format):
    return x.shape[1] if data_format == "channels_first" else x.shape[-1]


def _identities_ok(mg, identities, layer, x) -> bool:
    """Identity branches fit: as many filters as input channels, their BNs on the channel axis in float32."""
    if not identities:
        return True
    cin = _channels(x, layer.data_format)
    out = getattr(layer, "filters", None) or cin * getattr(layer, "depth_multiplier", 0)
    if cin is None or out != cin:
        return False
    for kind, key in identities:
        if kind == "bn" and not (m.bn_channel_axis_ok(m.op(mg, key), len(x.shape), layer.data_format)
                                 and m.same_float_dtype(layer, m.op(mg, key))):
            return False
    return True


def match(mg, add_key):
    """(conv keys, identity branches [(kind, key)], x, merged kernel size, padding) for an Add node that merges
    exactly (module docstring), else None."""
    if not m.is_sum(mg, add_key) or m.calls(mg, m.op(mg, add_key)) != 1:
        return None
    found = _branches(mg, add_key)
    if found is None:
        return None
    branches, x = found
    convs = [key for kind, key in branches if kind == "conv"]
    identities = [(kind, key) for kind, key in branches if kind != "conv"]
    layers = [m.op(mg, key) for key in convs]
    sizes = _dense_sizes(layers) if _same_setup(layers) else None
    if sizes is None or not _identities_ok(mg, identities, layers[0], x):
        return None
    rank = len(sizes[0])
    merged = tuple(max(size[i] for size in sizes) for i in range(rank))
    padding = _padding(layers, sizes)
    offsets = None if padding is None else _offsets(layers, sizes, merged, padding,
                                                     _spatial(x, layers[0].data_format, rank), bool(identities))
    if offsets is None:
        return None
    return convs, identities, x, merged, padding, offsets


def merged_weights(mg, convs, identities, merged, offsets):
    """(kernel, bias) of the one conv: the (dilation-expanded) kernels, each placed at its offsets, and the
    identity kernels summed. offsets: per conv branch, then one for every identity (see _offsets)."""
    layers = [m.op(mg, key) for key in convs]
    layout = m.conv_layout(layers[0])
    rank = len(merged)
    kernel, bias = 0.0, 0.0
    for layer, offset in zip(layers, offsets):
        k, b = m.conv_weights(layer)
        if any(d != 1 for d in layer.dilation_rate):
            k = kernels.dilate(k, layer.dilation_rate, rank)
        kernel = kernel + kernels.pad_to(k, merged, offset, rank)
        bias = bias + (0.0 if b is None else b)
    channels = kernel.shape[-2] * kernel.shape[-1] if layout == kernels.DEPTHWISE else kernel.shape[-1]
    for kind, key in identities:
        s, t = m.bn_affine(m.op(mg, key)) if kind == "bn" else (np.ones(channels), np.zeros(channels))
        ident = kernels.identity_kernel(merged, channels, getattr(layers[0], "groups", 1), layout, offsets[-1])
        k, b = kernels.fold(ident, None, s, t, layout)
        kernel, bias = kernel + k, bias + b
    return kernel, np.broadcast_to(bias, (channels,)).astype(np.float64)


def rewrite(mg):
    """({node key: replacement}, [Rewrite]) merging every matching Add of graph `mg`."""
    replace, records = {}, []
    for key in mg.ordered_nodes():
        found = match(mg, key)
        if found is None:
            continue
        convs, identities, x, merged, padding, offsets = found
        layers = [m.op(mg, k) for k in convs]
        template = max(layers, key=lambda layer: int(np.prod(layer.kernel_size)))  # first of the largest
        weights = merged_weights(mg, convs, identities, merged, offsets)
        call = m.new_conv(template, weights, kernel_size=merged, padding=padding, use_bias=True,
                          dilation_rate=(1,) * len(merged))
        for dropped in convs + [k for _, k in identities if k is not None]:
            replace[dropped] = lambda tensor_of: None
        replace[key] = lambda tensor_of, call=call, x=x: call(tensor_of(x))
        before = [layer.name for layer in layers] + [m.op(mg, k).name for _, k in identities if k] + [m.op(mg, key).name]
        records.append(Rewrite.make(mg, KIND, template.name, before, convs[0], key))
    return replace, records
