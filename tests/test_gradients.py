"""Gradients and fit() of every replacement against Keras's own layer, and PAC gradients against numerical
differentiation.

Part 1: a one-layer model is rebuilt with an implementation forced (`convrewrite.build`), and the gradients of
a random linear loss w.r.t. input, kernel and bias are compared with the Keras layer's on tiled, strided,
dilated, grouped and channels_first configurations, in training mode (uncached spectra) and in inference
mode (training=None: the FFT layers' cached spectra and their custom gradient). fit() is compared step for
step. PAC at conversion (kernel_blend = 0) must have Conv2D's gradients, and its blend gradient must equal a
central difference of the float64 reference in the blend (the loss is linear in it, so that is exact).

Part 2 (TensorFlow backend: JAX computes in float32 unless jax_enable_x64 is set): PacConv2D (every strategy,
the `wide` one has a hand-written gradient), PacConv2DTranspose and PacPool2D in float64, channels_last and channels_first, with a non-constant guidance and every PAC weight
trainable: tape gradients against central differences on randomly chosen entries of every input and weight.
"""

import os

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import reference as R
from convrewrite.layers.pac import PacConv2D, PacConv2DTranspose, PacPool2D
from conftest import gradients, rel_error

TOL = 1e-5
FULL = os.environ.get("CONVREWRITE_FULL_MATRIX", "0") not in ("", "0")

# (name, layer factory, input shape (no batch), {impl: options}); tile sizes small enough to give several tiles
CONFIGS = {
    "tiled": (lambda: keras.layers.Conv2D(4, 3, padding="same"), (14, 13, 3),
              {"fft": {}, "fft-tiled": {"tile_size": 4}, "pac": {}}),
    "strided": (lambda: keras.layers.Conv2D(4, (3, 4), strides=2, padding="same"), (13, 12, 3),
                {"fft": {}, "fft-tiled": {"tile_size": 3}, "pac": {}}),
    "dilated_valid": (lambda: keras.layers.Conv2D(4, 3, dilation_rate=2, padding="valid"), (14, 12, 3),
                      {"fft": {}, "fft-tiled": {"tile_size": 5}, "pac": {}}),
    "grouped": (lambda: keras.layers.Conv2D(6, 3, groups=3, padding="same"), (11, 10, 6),
                {"fft": {}, "fft-tiled": {"tile_size": 4}}),
    "depthwise_grouped": (lambda: keras.layers.Conv2D(8, 3, groups=4, strides=2, padding="same"), (12, 11, 4),
                          {"fft": {}, "fft-tiled": {"tile_size": 3}, "depthwise": {}}),
    "dw_mult2_dilated": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, dilation_rate=2, padding="same"),
                         (11, 12, 3), {"fft": {}, "fft-tiled": {"tile_size": 4}}),
    "channels_first": (lambda: keras.layers.Conv2D(4, 3, strides=(1, 2), padding="same", data_format="channels_first"),
                       (3, 12, 11), {"fft": {}, "fft-tiled": {"tile_size": 4}, "pac": {}}),
    "channels_first_dw": (lambda: keras.layers.Conv2D(6, 3, groups=3, padding="same", data_format="channels_first"),
                          (3, 10, 9), {"fft": {}, "fft-tiled": {"tile_size": 4}, "depthwise": {}}),
    # kernel widths in TF's slow depthwise band: run wider (zero taps) by depthwise-wide
    "dw_wide_mult2": (lambda: keras.layers.DepthwiseConv2D((3, 12), depth_multiplier=2, padding="same"), (9, 15, 3),
                      {"depthwise-wide": {}, "fft": {}}),
    "dw_wide_valid_strided": (lambda: keras.layers.DepthwiseConv2D((2, 12), strides=2, padding="valid"), (9, 16, 3),
                              {"depthwise-wide": {"run_kernel_size": (3, 14)}}),
    "grouped_wide_dilated_cf": (lambda: keras.layers.Conv2D(4, (3, 13), groups=4, dilation_rate=(1, 2), padding="same",
                                                            data_format="channels_first"), (4, 8, 27),
                                {"depthwise-wide": {}}),
}
CELLS = [(c, impl) for c, (_, _, impls) in CONFIGS.items() for impl in impls]


def _pair(config, impl, rng):
    """(original one-layer model, its layer, rebuilt model, its replacement layer, x) with random weights."""
    make, shape, impls = CONFIGS[config]
    x_in = keras.Input(shape)
    layer = make()
    model = keras.Model(x_in, layer(x_in))
    for w in model.weights:
        w.assign(rng.standard_normal(tuple(w.shape)).astype("float32") * (0.3 if len(w.shape) > 1 else 1.0))
    plan = convrewrite.plan(model, cost_model=None)
    plan.force(layer.name, impl, **impls[impl])
    new = convrewrite.build(model, plan)
    new_layer = new.get_layer(layer.name)
    assert new_layer is not layer and type(new_layer) is not type(layer)
    x = rng.standard_normal((2,) + shape).astype("float32")
    return model, layer, new, new_layer, x


def _grads(model, layer, x, target, training):
    """Gradients of sum(model(x) * target) w.r.t. [x, kernel, bias] of `layer`."""
    weights = [layer.kernel] + ([layer.bias] if layer.use_bias else [])
    return gradients(lambda t: model(t, training=training) * target, x, weights)


def _grad_cells():
    """Every (config, impl) in both modes with CONVREWRITE_FULL_MATRIX=1; by default each in one mode, seeded,
    so that both modes and every configuration and implementation still run."""
    import random

    r = random.Random(16)
    for i, (config, impl) in enumerate(CELLS):
        modes = [True, None] if FULL else [(True, None)[(i + r.randint(0, 1)) % 2]]
        for training in modes:
            yield pytest.param(config, impl, training, id=f"{config}-{impl}-{'training' if training else 'inference'}")


@pytest.mark.parametrize("config,impl,training", list(_grad_cells()))
def test_replacement_gradients_equal_keras(config, impl, training, rng):
    model, layer, new, new_layer, x = _pair(config, impl, rng)
    target = keras.ops.convert_to_tensor(rng.standard_normal(model(x).shape).astype("float32"))
    new(x)  # fill a spectrum cache, so that inference mode takes its cached branch
    want = _grads(model, layer, x, target, training)
    got = _grads(new, new_layer, x, target, training)
    assert rel_error(new(x, training=training), model(x, training=training)) <= TOL  # (a scalar loss cancels)
    assert len(got) == len(want)
    names = ["input", "kernel", "bias"]
    for name, g, w in zip(names, got, want):
        assert g is not None, name
        g = np.asarray(g)
        w = np.asarray(w)
        if name == "kernel" and impl in ("depthwise", "depthwise-wide"):
            g = g.reshape(w.shape)  # DepthwiseConv2D's (kh, kw, C, M) is Conv2D's (kh, kw, 1, C*M)
        assert rel_error(g, w) <= TOL, name


@pytest.mark.parametrize("config", ["tiled", "strided", "channels_first"])
def test_pac_blend_gradient_at_conversion_equals_reference_difference(config, rng):
    """dLoss/d(kernel_blend) at conversion drives PAC's learning: compare it with the float64 reference."""
    model, layer, new, new_layer, x = _pair(config, "pac", rng)
    target = rng.standard_normal(model(x).shape).astype("float32")
    _, g_blend = gradients(lambda t: new(t, training=True) * target, x, [new_layer.blend])
    cf = layer.data_format == "channels_first"
    to_last = (lambda t: np.transpose(t, (0, 2, 3, 1))) if cf else (lambda t: t)
    t_last = to_last(target)

    def ref_loss(b):
        out = R.pac_conv2d(to_last(x), to_last(x), layer.kernel.numpy(), layer.bias.numpy(), strides=layer.strides,
                           padding=layer.padding, dilation=layer.dilation_rate, kernel_blend=b)
        return float(np.sum(out * t_last))

    numeric = (ref_loss(0.5) - ref_loss(-0.5)) / 1.0  # linear in b: exact
    assert abs(numeric) > 1e-3  # the guidance varies, so the blend has something to learn from
    assert abs(float(g_blend) - numeric) <= 1e-4 * max(abs(numeric), 1.0)


FIT_CELLS = CELLS if FULL else [c for c in CELLS if c[0] in ("tiled", "depthwise_grouped", "channels_first",
                                                                "grouped_wide_dilated_cf")]


@pytest.mark.parametrize("config,impl", FIT_CELLS, ids=[f"{c}-{i}" for c, i in FIT_CELLS])
def test_fit_matches_keras(config, impl, rng):
    """SGD through fit() gives Keras's weights (one step for PAC, whose blend starts moving after it)."""
    model, layer, new, new_layer, x = _pair(config, impl, rng)
    x = np.concatenate([x, rng.standard_normal(x.shape).astype("float32")])
    y = rng.standard_normal((4,) + tuple(model(x[:1]).shape[1:])).astype("float32")
    steps = 1 if impl == "pac" else 2
    start = layer.kernel.numpy().copy()
    for m in (model, new):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        m.fit(x[: 2 * steps], y[: 2 * steps], epochs=1, batch_size=2, shuffle=False, verbose=0)
    want = [layer.kernel.numpy()] + ([layer.bias.numpy()] if layer.use_bias else [])
    got = [new_layer.kernel.numpy()] + ([new_layer.bias.numpy()] if new_layer.use_bias else [])
    assert np.abs(want[0] - start).max() > 1e-4  # the step moved the weights: equality below is about it
    for g, w in zip(got, want):
        assert rel_error(g.reshape(w.shape), w) <= TOL
    if impl == "pac":  # its blend learned from the varying guidance: now adaptive, no longer the Conv2D
        assert float(new_layer.blend.numpy()) != 0.0
    else:
        assert rel_error(new(x), model(x)) <= TOL


# ---- PAC layers vs numerical differentiation ---------------------------------------------------------------
def _numeric_check(layer, inputs, rng, n_entries=3, eps=1e-6):
    """Tape gradients of sum(layer(inputs) * target) w.r.t. inputs and trainable weights vs central differences
    on `n_entries` random entries of each (float64)."""
    inputs = [keras.Variable(v, dtype="float64", trainable=False) for v in inputs]
    out = layer([inputs[0], inputs[1]])
    target = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(keras.ops.convert_to_numpy(layer([inputs[0], inputs[1]])) * target))

    (gx, gg), *gw = gradients(lambda t: layer(list(t)) * target, (inputs[0].value, inputs[1].value),
                              layer.trainable_variables)
    variables = inputs + list(layer.trainable_variables)
    grads = [gx, gg, *gw]
    names = ["x", "guidance"] + [v.path for v in layer.trainable_variables]
    checked = []
    for name, var, grad in zip(names, variables, grads):
        assert grad is not None, name
        grad = np.asarray(grad)
        flat = var.numpy().reshape(-1)
        scale = max(np.max(np.abs(grad)), 1e-3)
        for idx in rng.choice(flat.size, size=min(n_entries, flat.size), replace=False):
            orig = flat[idx]
            vals = []
            for step in (eps, -eps):
                f = flat.copy()
                f[idx] = orig + step
                var.assign(f.reshape(var.shape))
                vals.append(float(loss()))
            var.assign(flat.reshape(var.shape))  # restored
            numeric = (vals[0] - vals[1]) / (2 * eps)
            assert abs(grad.reshape(-1)[idx] - numeric) <= 1e-6 * scale + 1e-7, (name, idx, grad.reshape(-1)[idx], numeric)
        checked.append(name)
    return checked


def _cf(a, channels_first):
    return np.transpose(a, (0, 3, 1, 2)) if channels_first else a


@pytest.mark.tensorflow_only("float64 numerical differentiation: JAX runs float32 without jax_enable_x64")
@pytest.mark.parametrize("strategy", ["patch", "shift", "wide"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_pac_conv_gradients_numerical(strategy, data_format, rng):
    cf = data_format == "channels_first"
    layer = PacConv2D(3, (3, 2), padding="same", strides=1 if strategy == "wide" else 2, dtype="float64",
                      kernel_type="inv_1.5_1", kernel_blend=0.6, learn_guidance_scale=True, normalize_kernel=True,
                      strategy=strategy, data_format=data_format)
    x, g = rng.standard_normal((2, 7, 6, 5)), rng.standard_normal((2, 7, 6, 2))
    checked = _numeric_check(layer, [_cf(x, cf), _cf(g, cf)], rng)
    assert any("kernel_blend" in c for c in checked) and any("inv_alpha" in c for c in checked)


@pytest.mark.tensorflow_only("float64 numerical differentiation: JAX runs float32 without jax_enable_x64")
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("kernel,strides,padding", [(3, 2, "same"), (4, 2, "valid"), ((2, 3), 1, "same")])
def test_pac_transpose_gradients_numerical(kernel, strides, padding, data_format, rng):
    if not FULL and data_format == "channels_first" and kernel != 3:
        pytest.skip("channels_first runs on one configuration by default; CONVREWRITE_FULL_MATRIX=1 runs all")
    cf = data_format == "channels_first"
    layer = PacConv2DTranspose(3, kernel, strides=strides, padding=padding, dtype="float64", kernel_type="gaussian",
                               kernel_blend=0.7, learn_guidance_scale=True, normalize_kernel=padding == "same",
                               data_format=data_format)
    x = rng.standard_normal((1, 4, 3, 4))
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    size = [n * strides if padding == "same" else n * strides + max(kk - strides, 0) for n, kk in zip((4, 3), k)]
    g = rng.standard_normal((1, *size, 2))
    checked = _numeric_check(layer, [_cf(x, cf), _cf(g, cf)], rng)
    assert any("guidance_scale" in c for c in checked)


@pytest.mark.tensorflow_only("float64 numerical differentiation: JAX runs float32 without jax_enable_x64")
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("pool,strides,padding", [(3, 2, "same"), (2, 1, "valid")])
def test_pac_pool_gradients_numerical(pool, strides, padding, data_format, rng):
    cf = data_format == "channels_first"
    layer = PacPool2D(pool, strides, padding=padding, dtype="float64", kernel_type="inv_1_2", kernel_blend=0.8,
                      learn_guidance_scale=True, data_format=data_format)
    x, g = rng.standard_normal((2, 7, 6, 3)), rng.standard_normal((2, 7, 6, 2))
    _numeric_check(layer, [_cf(x, cf), _cf(g, cf)], rng)
