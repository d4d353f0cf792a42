"""An independent PAC oracle: a per-pixel loop of Su et al.'s pixel-adaptive convolution,

    v'_i = sum_j K(f_i, f_j) W[p_i - p_j] v_j + b,

written here from the definition and the conventions documented in convrewrite/layers/pac.py (x zero-padded
as Conv2D pads it, guidance edge-padded, f_i the guidance under the window's centre tap (kh // 2, kw // 2),
with normalize_kernel only taps on real pixels count; transposed: x[i] lands on output pixel i*s + t - pb with
guidance g[i*s], f_o = g[o]). It shares no code with convrewrite.reference (which is vectorized with sliding
windows and einsum): it walks output pixels and taps one by one.

The oracle itself is anchored to Keras: with constant guidance it must equal Conv2D, Conv2DTranspose and
AveragePooling2D. It then checks reference.pac_* and the PAC layers with non-constant guidance, odd and even
kernels, strides, dilation, SAME/VALID, normalisation, every kernel type, blend and guidance scale.
"""

import math

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import reference as R
from convrewrite.layers.pac import PacConv2D, PacConv2DTranspose, PacPool2D
from conftest import BACKEND, rel_error

# The oracle against Keras's own layers: in float64 on TensorFlow (agreement to rounding); JAX computes in
# float32 unless jax_enable_x64 is set, so there the Keras layers run float32 and agree to float32 rounding.
KERAS_DTYPE, KERAS_TOL = ("float64", 1e-12) if BACKEND == "tensorflow" else ("float32", 1e-5)


# ---- the oracle ------------------------------------------------------------------------------------------
def kernel_value(d2, kernel_type, blend):
    if kernel_type == "gaussian":
        k = math.exp(-0.5 * d2)
    else:  # "inv_<alpha>_<lambda>": (1 + d2 / alpha) ** (-lambda / 2), alpha with the layers' + 1e-6
        _, a, lam = kernel_type.split("_")[:3]
        k = (1.0 + d2 / (float(a) + 1e-6)) ** (-0.5 * float(lam))
    return k if blend is None else 1.0 + blend * (k - 1.0)


def before_pad(n, k, s, d, padding):
    """Rows (or cols) of padding before the image, and the output length, as Conv2D has them."""
    eff = (k - 1) * d + 1
    if padding == "valid":
        return 0, (n - eff) // s + 1
    out = math.ceil(n / s)
    return max((out - 1) * s + eff - n, 0) // 2, out


def oracle_pac(x, g, kernel_hw, weight=None, bias=None, strides=(1, 1), dilation=(1, 1), padding="valid",
               kernel_type="gaussian", normalize=False, blend=None, scale=None):
    """Per-pixel PAC. x: (N, H, W, C); g: (N, H, W, F); weight: (kh, kw, C, O) or None for pooling (per channel)."""
    n, h, w, c = x.shape
    kh, kw = kernel_hw
    if scale is not None:
        g = g * scale
    (pt, ho), (pl, wo) = (before_pad(h, kh, strides[0], dilation[0], padding),
                          before_pad(w, kw, strides[1], dilation[1], padding))
    out = np.zeros((n, ho, wo, c if weight is None else weight.shape[3]))
    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                def pixel(a, e):  # tap (a, e) of this window: (real row, real col)
                    return oy * strides[0] + a * dilation[0] - pt, ox * strides[1] + e * dilation[1] - pl

                cy, cx = pixel(kh // 2, kw // 2)
                f_i = g[b, min(max(cy, 0), h - 1), min(max(cx, 0), w - 1)]  # edge-padded guidance
                acc, norm = 0.0, 0.0
                for a in range(kh):
                    for e in range(kw):
                        y, xx = pixel(a, e)
                        inside = 0 <= y < h and 0 <= xx < w
                        f_j = g[b, min(max(y, 0), h - 1), min(max(xx, 0), w - 1)]
                        k = kernel_value(float(np.sum((f_i - f_j) ** 2)), kernel_type, blend)
                        if not inside:
                            continue  # x is zero there, and a padded tap is not a pixel for the normaliser
                        v = x[b, y, xx]
                        acc = acc + k * (v if weight is None else v @ weight[a, e])
                        norm += k
                if normalize:
                    acc = acc / norm if norm != 0 else acc
                out[b, oy, ox] = acc + (0.0 if bias is None else bias)
    return out


def oracle_pac_transpose(x, g, weight, bias=None, strides=(1, 1), padding="valid", kernel_type="gaussian",
                         normalize=False, blend=None, scale=None):
    """Per-output-pixel transposed PAC. x: (N, H, W, C); g: (N, Ho, Wo, F) at the output size;
    weight: (kh, kw, O, C) as Conv2DTranspose stores it. Output o gets x[i] W[t] for o = i*s + t - pb."""
    n, h, w, c = x.shape
    kh, kw, o_ch, _ = weight.shape
    (sh, sw) = strides
    if scale is not None:
        g = g * scale
    ho, wo = g.shape[1:3]
    pb = [max(k - s, 0) // 2 if padding == "same" else 0 for k, s in ((kh, sh), (kw, sw))]
    out = np.zeros((n, ho, wo, o_ch))
    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                acc, norm = np.zeros(o_ch), 0.0
                for i in range(h):
                    a = oy + pb[0] - i * sh
                    if not 0 <= a < kh:
                        continue
                    for j in range(w):
                        e = ox + pb[1] - j * sw
                        if not 0 <= e < kw:
                            continue
                        k = kernel_value(float(np.sum((g[b, oy, ox] - g[b, i * sh, j * sw]) ** 2)), kernel_type, blend)
                        acc += k * (weight[a, e] @ x[b, i, j])
                        norm += k
                if normalize and norm != 0:
                    acc = acc / norm
                out[b, oy, ox] = acc + (0.0 if bias is None else bias)
    return out


def _inputs(rng, n, h, w, c, f):
    return rng.standard_normal((n, h, w, c)), rng.standard_normal((n, h, w, f))


# ---- the oracle against Keras (constant guidance: K = 1 on every tap) --------------------------------------
@pytest.mark.parametrize("kernel,strides,dilation,padding", [
    ((3, 3), (1, 1), (1, 1), "same"), ((2, 4), (2, 1), (1, 1), "same"), ((3, 2), (1, 1), (2, 1), "valid"),
    ((4, 3), (2, 2), (1, 1), "valid")])
def test_oracle_with_constant_guidance_is_keras_conv_and_average_pool(kernel, strides, dilation, padding, rng):
    x, _ = _inputs(rng, 2, 7, 8, 3, 1)
    g = np.full((2, 7, 8, 2), rng.standard_normal())
    weight, bias = rng.standard_normal(kernel + (3, 4)), rng.standard_normal(4)
    conv = keras.layers.Conv2D(4, kernel, strides=strides, dilation_rate=dilation, padding=padding, dtype=KERAS_DTYPE)
    conv.build(x.shape)
    conv.set_weights([weight, bias])
    got = oracle_pac(x, g, kernel, weight, bias, strides, dilation, padding, "inv_1_1", blend=0.3)
    assert rel_error(got, keras.ops.convert_to_numpy(conv(x))) <= KERAS_TOL
    if dilation == (1, 1):
        pool = keras.layers.AveragePooling2D(kernel, strides, padding=padding, dtype=KERAS_DTYPE)
        got = oracle_pac(x, g, kernel, strides=strides, padding=padding, normalize=True)
        assert rel_error(got, keras.ops.convert_to_numpy(pool(x))) <= KERAS_TOL


@pytest.mark.parametrize("kernel,strides,padding", [(3, 2, "same"), (4, 2, "same"), (4, 2, "valid"), ((2, 3), 1, "same"),
                                                    (3, 3, "valid")])
def test_oracle_transpose_with_constant_guidance_is_keras_conv_transpose(kernel, strides, padding, rng):
    x = rng.standard_normal((2, 4, 3, 3))
    layer = keras.layers.Conv2DTranspose(2, kernel, strides=strides, padding=padding, dtype=KERAS_DTYPE)
    layer.build(x.shape)
    weight, bias = rng.standard_normal(tuple(layer.kernel.shape)), rng.standard_normal(2)
    layer.set_weights([weight, bias])
    want = keras.ops.convert_to_numpy(layer(x))
    g = np.full(want.shape[:3] + (2,), 0.7)
    s = (strides, strides) if isinstance(strides, int) else strides
    assert rel_error(oracle_pac_transpose(x, g, weight, bias, s, padding, "gaussian"), want) <= KERAS_TOL


# ---- reference.py against the oracle (non-constant guidance) ------------------------------------------------
CONV_CASES = [  # kernel, strides, dilation, padding, kernel_type, normalize, blend, scale
    ((3, 3), (1, 1), (1, 1), "same", "gaussian", False, None, None),
    ((2, 2), (1, 1), (1, 1), "same", "gaussian", True, None, None),       # even: the centre tap is (1, 1)
    ((4, 3), (2, 1), (1, 1), "same", "inv_1_1", False, 0.4, None),
    ((3, 4), (1, 1), (2, 1), "valid", "inv_2_0.5", True, None, (0.5, 2.0)),  # (Keras: no strides with dilation)
    ((5, 5), (2, 2), (1, 1), "same", "gaussian", True, 0.9, (1.5, 0.3)),
    ((1, 3), (1, 1), (1, 3), "same", "inv_0.5_2", False, None, None),
]


def _conv_kwargs(case):
    kernel, strides, dilation, padding, kernel_type, normalize, blend, scale = case
    return kernel, dict(strides=strides, dilation=dilation, padding=padding, kernel_type=kernel_type,
                        normalize=normalize, blend=blend, scale=None if scale is None else np.array(scale))


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_reference_pac_conv_and_pool_equal_the_oracle(case, rng):
    kernel, kw = _conv_kwargs(case)
    x, g = _inputs(rng, 2, 8, 7, 3, 2)
    weight, bias = rng.standard_normal(kernel + (3, 2)), rng.standard_normal(2)
    want = oracle_pac(x, g, kernel, weight, bias, **kw)
    got = R.pac_conv2d(x, g, weight, bias, strides=kw["strides"], padding=kw["padding"], dilation=kw["dilation"],
                       kernel_type=kw["kernel_type"], normalize_kernel=kw["normalize"], kernel_blend=kw["blend"],
                       guidance_scale=kw["scale"])
    assert rel_error(got, want) <= 1e-12
    want = oracle_pac(x, g, kernel, **{**kw, "normalize": True})
    got = R.pac_pool2d(x, g, kernel, strides=kw["strides"], padding=kw["padding"], dilation=kw["dilation"],
                       kernel_type=kw["kernel_type"], normalize_kernel=True, kernel_blend=kw["blend"],
                       guidance_scale=kw["scale"])
    assert rel_error(got, want) <= 1e-12


TRANSPOSE_CASES = [  # kernel, strides, padding, kernel_type, normalize, blend
    ((3, 3), (2, 2), "same", "gaussian", False, None),
    ((4, 4), (2, 2), "same", "inv_1_1", True, None),
    ((2, 3), (1, 2), "valid", "gaussian", True, 0.6),
    ((4, 2), (3, 1), "valid", "inv_2_1", False, None),
]


def _transpose_size(h, w, kernel, strides, padding):
    return tuple(n * s if padding == "same" else n * s + max(k - s, 0) for n, k, s in zip((h, w), kernel, strides))


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
def test_reference_pac_transpose_equals_the_oracle(case, rng):
    kernel, strides, padding, kernel_type, normalize, blend = case
    x = rng.standard_normal((2, 4, 3, 3))
    g = rng.standard_normal((2,) + _transpose_size(4, 3, kernel, strides, padding) + (2,))
    weight, bias = rng.standard_normal(kernel + (2, 3)), rng.standard_normal(2)
    want = oracle_pac_transpose(x, g, weight, bias, strides, padding, kernel_type, normalize, blend)
    got = R.pac_conv2d_transpose(x, g, weight, bias, strides=strides, padding=padding, kernel_type=kernel_type,
                                 normalize_kernel=normalize, kernel_blend=blend)
    assert rel_error(got, want) <= 1e-12


# ---- the layers against the oracle (float32, both data formats) ---------------------------------------------
def _cf(a, channels_first):
    return np.transpose(a, (0, 3, 1, 2)) if channels_first else a


def _last(a, channels_first):
    a = keras.ops.convert_to_numpy(a)
    return np.transpose(a, (0, 2, 3, 1)) if channels_first else a


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("strategy", ["patch", "shift", "wide"])
@pytest.mark.parametrize("case", CONV_CASES[:5], ids=str)
def test_pac_layers_equal_the_oracle(case, strategy, data_format, rng):
    kernel, kw = _conv_kwargs(case)
    if strategy == "wide" and kw["strides"] != (1, 1):
        strategy = "shift"  # auto never takes wide with strides; the layer still accepts it, at a cost
    cf = data_format == "channels_first"
    x, g = _inputs(rng, 2, 8, 7, 5, 2)
    x, g = x.astype("float32"), g.astype("float32")
    layer = PacConv2D(3, kernel, strides=kw["strides"], dilation_rate=kw["dilation"], padding=kw["padding"],
                      kernel_type=kw["kernel_type"], normalize_kernel=kw["normalize"], kernel_blend=kw["blend"],
                      learn_guidance_scale=kw["scale"] is not None, strategy=strategy, data_format=data_format)
    layer([_cf(x, cf), _cf(g, cf)])
    weights = [rng.standard_normal(tuple(v.shape)).astype("float32") for v in (layer.kernel, layer.bias)]
    layer.kernel.assign(weights[0])
    layer.bias.assign(weights[1])
    if kw["scale"] is not None:
        layer.guidance_scale.assign(kw["scale"])
    got = _last(layer([_cf(x, cf), _cf(g, cf)]), cf)
    want = oracle_pac(x.astype(np.float64), g.astype(np.float64), kernel, weights[0].astype(np.float64),
                      weights[1].astype(np.float64), **kw)
    assert rel_error(got, want) <= 1e-5
    pool = PacPool2D(kernel, kw["strides"], padding=kw["padding"], dilation_rate=kw["dilation"],
                     kernel_type=kw["kernel_type"], kernel_blend=kw["blend"], data_format=data_format)
    want = oracle_pac(x.astype(np.float64), g.astype(np.float64), kernel, **{**kw, "normalize": True, "scale": None})
    assert rel_error(_last(pool([_cf(x, cf), _cf(g, cf)]), cf), want) <= 1e-5


@pytest.mark.parametrize("strategy", ["patch", "shift", "wide"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
def test_pac_transpose_layer_equals_the_oracle(case, data_format, strategy, rng):
    """Every strategy against the oracle (the `wide` one was only compared with `shift` before)."""
    kernel, strides, padding, kernel_type, normalize, blend = case
    if data_format == "channels_first" and strategy != "wide":
        pytest.skip("channels_first: one strategy is enough (the layout is handled before the strategy)")
    cf = data_format == "channels_first"
    x = rng.standard_normal((2, 4, 3, 5)).astype("float32")
    g = rng.standard_normal((2,) + _transpose_size(4, 3, kernel, strides, padding) + (2,)).astype("float32")
    layer = PacConv2DTranspose(3, kernel, strides=strides, padding=padding, kernel_type=kernel_type,
                               normalize_kernel=normalize, kernel_blend=blend, data_format=data_format,
                               strategy=strategy)
    layer([_cf(x, cf), _cf(g, cf)])
    weight, bias = (rng.standard_normal(tuple(v.shape)).astype("float32") for v in (layer.kernel, layer.bias))
    layer.set_weights([weight, bias] + layer.get_weights()[2:])
    want = oracle_pac_transpose(x.astype(np.float64), g.astype(np.float64), weight.astype(np.float64),
                                bias.astype(np.float64), strides, padding, kernel_type, normalize, blend)
    assert rel_error(_last(layer([_cf(x, cf), _cf(g, cf)]), cf), want) <= 1e-5


def test_blended_conversion_equals_the_oracle(rng):
    """optimize's PAC conversion, once its blend has moved, computes PAC with the named guidance."""
    image = keras.Input((8, 7, 3), name="image")
    conv = keras.layers.Conv2D(4, 3, padding="same", name="c")
    model = keras.Model(image, conv(image))
    for v in model.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype("float32"))
    new = convrewrite.optimize(model, pac={"layers": ["c"], "guidance": "image", "kernel_type": "inv_1_1"},
                               cost_model=None, check_speed=False)
    assert isinstance(new.get_layer("c"), PacConv2D)
    new.get_layer("c").blend.assign(0.7)
    x = rng.standard_normal((2, 8, 7, 3)).astype("float32")
    want = oracle_pac(x.astype(np.float64), x.astype(np.float64), (3, 3), conv.kernel.numpy().astype(np.float64),
                      conv.bias.numpy().astype(np.float64), padding="same", kernel_type="inv_1_1", blend=0.7)
    assert rel_error(new(x), want) <= 1e-5
    assert rel_error(model(x), want) > 1e-3  # the blend matters: the check above is not the Conv2D's
