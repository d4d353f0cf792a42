"""Non-finite and overflow-range inputs: replacement layers give Keras's result pattern for pattern (NaN
where Keras has NaN, +Inf where +Inf, -Inf where -Inf), and the per-call guard that routes such calls
through the direct computation works compiled (tf.function / jax.jit), under fit, mixed precision and .keras round trips.
The last test is property-based: random small models, configs and inputs, seeded."""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D
from convrewrite.timing import compiled
from conftest import BACKEND, gradients, random_cases

TOL = 1e-5


def nonfinite_mismatches(a, b):
    """Positions where a and b differ in kind (NaN / +Inf / -Inf / finite): an oracle of the test's own,
    independent of convrewrite.verify."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return int(np.count_nonzero((np.isnan(a) != np.isnan(b)) | ((a == np.inf) != (b == np.inf))
                                | ((a == -np.inf) != (b == -np.inf))))


def relative_error(a, b):
    """Normwise relative error over the positions where b is finite (patterns checked separately)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    keep = np.isfinite(b)
    if not keep.any():
        return 0.0
    scale = np.abs(b[keep]).max()
    err = np.abs(a[keep] - b[keep]).max()
    return float(err / scale) if scale > 0 else float(err)


def _same_pattern(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert nonfinite_mismatches(a, b) == 0, (
        f"NaN {np.isnan(a).sum()} vs {np.isnan(b).sum()}, +Inf {(a == np.inf).sum()} vs {(b == np.inf).sum()}, "
        f"-Inf {(a == -np.inf).sum()} vs {(b == -np.inf).sum()}")
    return relative_error(a, b)


def _issue_model():
    m = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 9, padding="same", name="c")])
    return m


def _forced(model, choices):
    plan = convrewrite.plan(model, cost_model=None)
    for site, (impl, options) in choices.items():
        plan.force(site, impl, **options)
    return convrewrite.build(model, plan)


@pytest.mark.parametrize("impl", ["fft", "fft-tiled"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_one_non_finite_pixel_lands_where_keras_puts_it(rng, impl, value):
    """Issue 15 reproduction: one NaN gave 324 NaN outputs from Keras and 4096 from the FFT model; one Inf
    gave 324 Inf from Keras and 4096 NaN."""
    m = _issue_model()
    f = _forced(m, {"c": (impl, {})})
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    x[0, 10, 10, 1] = value
    want, got = np.asarray(m(x)), np.asarray(f(x))
    assert (~np.isfinite(want)).sum() == 324
    assert _same_pattern(got, want) <= TOL
    # the clean image of the batch is unaffected either way
    assert np.isfinite(got[1]).all()


def test_overflow_range_input_stays_finite(rng):
    """Issue 15 reproduction: an input scaled to 1e38 gave a finite Keras output and an all-NaN FFT output."""
    m = _issue_model()
    m.layers[0].set_weights([w * 1e-3 for w in m.layers[0].get_weights()])
    f = _forced(m, {"c": ("fft", {})})
    x = rng.standard_normal((1, 32, 32, 3)).astype("float32")
    x = (x / np.abs(x).max() * 1e38).astype("float32")
    want, got = np.asarray(m(x)), np.asarray(f(x))
    assert np.isfinite(want).all()
    assert _same_pattern(got, want) <= TOL
    # finite inputs large enough to overflow Keras's own sums: Inf in the same places
    x2 = (x * 3.0).astype("float32")
    with np.errstate(over="ignore"):
        _same_pattern(np.asarray(f(x2)), np.asarray(m(x2)))


def test_ordinary_inputs_still_take_the_fft_path(rng):
    """The guard must not send ordinary calls to the direct path: FFT results differ from Keras's by
    rounding (not bit for bit), so a bitwise-equal result would mean the FFT path was skipped."""
    m = _issue_model()
    f = _forced(m, {"c": ("fft", {})})
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32") * 1e6
    want, got = np.asarray(m(x)), np.asarray(f(x))
    assert relative_error(got, want) <= TOL and not np.array_equal(got, want)


def _twins(rng, depthwise=False, tile_size="full", shape=(2, 12, 12, 3), **kwargs):
    cls, fcls = (keras.layers.DepthwiseConv2D, FFTDepthwiseConv2D) if depthwise else (keras.layers.Conv2D, FFTConv2D)
    args = dict(kernel_size=5, padding="same", bias_initializer="random_normal", **kwargs)
    if not depthwise:
        args["filters"] = 3
    k = cls(**args)
    k.build(shape)
    f = fcls(**k.get_config(), tile_size=tile_size)
    f.build(shape)
    f.set_weights(k.get_weights())
    return k, f


@pytest.mark.parametrize("depthwise", [False, True])
def test_compiled_and_gradients(rng, depthwise):
    k, f = _twins(rng, depthwise)
    x = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    x[1, 4, 7, 2] = np.nan
    x[0, 2, 2, 0] = -np.inf
    run_k = compiled(lambda t: k(t), [k])
    run_f = compiled(lambda t: f(t), [f])
    assert _same_pattern(run_f(x), run_k(x)) <= TOL
    clean = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    assert _same_pattern(run_f(clean), run_k(clean)) <= TOL

    # The loss reads one output pixel per channel: linear in the output, so the gradients stay far from
    # overflow even for huge inputs and are compared for value, not only for pattern.
    pick = np.zeros((2, 12, 12, 3), "float32")
    pick[0, 6, 6, :] = 1.0

    def grads(layer, t):
        return gradients(lambda u: layer(u, training=True) * pick, t, layer.trainable_variables)[1:]

    # clean: the FFT branch; 1e20 and 3e37: routed to Keras's branch, whose gradients must be Keras's
    huge = (clean / np.abs(clean).max() * 3e37).astype("float32")
    for t in (clean, (clean * 1e20).astype("float32"), huge):
        for gk, gf in zip(compiled(lambda u: grads(k, u), [k])(t), compiled(lambda u: grads(f, u), [f])(t)):
            _same_pattern(gf, gk)
            assert relative_error(gf, gk) <= 1e-4


def test_fit_runs_with_the_guard(rng):
    inp = keras.Input((10, 10, 2))
    m = keras.Model(inp, keras.layers.Conv2D(2, 5, padding="same", name="c")(inp))
    f = _forced(m, {"c": ("fft", {})})
    f.compile("sgd", "mse")
    m.compile("sgd", "mse")
    x = rng.standard_normal((4, 10, 10, 2)).astype("float32")
    y = rng.standard_normal((4, 10, 10, 2)).astype("float32")
    m.fit(x, y, epochs=2, batch_size=2, verbose=0, shuffle=False)
    f.fit(x, y, epochs=2, batch_size=2, verbose=0, shuffle=False)
    assert relative_error(f.get_weights()[0], m.get_weights()[0]) <= 1e-4
    bad = x.copy()
    bad[0, 3, 3, 0] = np.nan
    _same_pattern(f.predict(bad, verbose=0), m.predict(bad, verbose=0))


def test_mixed_precision_overflow_matches_keras(rng):
    """Under mixed_float16 Keras's direct sums saturate to Inf above 65504 where float32 FFTs would not:
    such calls are routed to the direct computation, so Inf lands where Keras puts it."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        k, f = _twins(rng)
        x = rng.standard_normal((2, 12, 12, 3)).astype("float32")
        assert relative_error(np.asarray(f(x), np.float32), np.asarray(k(x), np.float32)) <= 1e-2
        k.set_weights([v * 20 for v in k.get_weights()])
        f.set_weights(k.get_weights())
        big = np.clip(x * 3000, -60000, 60000).astype("float16")
        assert np.isfinite(big).all()
        want = np.asarray(k(big), np.float32)
        assert not np.isfinite(want).all()
        _same_pattern(np.asarray(f(big), np.float32), want)
        nan = x.astype("float16")
        nan[0, 5, 5, 1] = np.nan
        _same_pattern(np.asarray(f(nan), np.float32), np.asarray(k(nan), np.float32))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_non_finite_weights_follow_keras(rng):
    k, f = _twins(rng)
    w = k.get_weights()
    w[0][2, 2, 1, 0] = np.nan
    k.set_weights(w)
    f.set_weights(w)
    x = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    _same_pattern(f(x), k(x))


def test_keras_file_round_trip_keeps_the_guard(rng, tmp_path):
    m = _issue_model()
    f = _forced(m, {"c": ("fft-tiled", {"tile_size": 7})})
    f.save(tmp_path / "f.keras")
    g = keras.models.load_model(tmp_path / "f.keras")
    x = rng.standard_normal((1, 32, 32, 3)).astype("float32")
    x[0, 0, 31, 2] = np.inf
    _same_pattern(g(x), m(x))


@pytest.mark.parametrize("tile_size", [4, None])
def test_input_smaller_than_the_kernel_raises_like_keras(rng, tile_size):
    """Issue 15 reproduction: with an unknown size at build and an input smaller than the kernel under VALID
    padding, Keras raises and the FFT layer returned an empty tensor. It now raises Keras's own error,
    eagerly and inside tf.function (with unknown sizes: TensorFlow; JAX's shapes are always known, and its
    Keras raises a ValueError of its own, which the FFT layer must raise too)."""
    k = keras.layers.Conv2D(2, 5)
    k.build((None, None, None, 3))
    f = FFTConv2D(**k.get_config(), tile_size=tile_size)
    f.build((None, None, None, 3))
    f.set_weights(k.get_weights())
    x = np.ones((1, 3, 3, 3), "float32")
    ok = rng.standard_normal((1, 9, 9, 3)).astype("float32")
    if BACKEND != "tensorflow":
        for layer in (k, f):
            with pytest.raises(ValueError, match="empty output"):
                layer(x)
        assert relative_error(f(ok), k(ok)) <= TOL
        return
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
        k(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
        f(x)
    fn = tf.function(lambda t: f(t), input_signature=[tf.TensorSpec((None, None, None, 3))])
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
        fn(x)
    assert relative_error(fn(ok), k(ok)) <= TOL


# ---- property-based: random small models, configs and inputs ------------------------------------------
def _random_model(rng):
    """A 1-3 conv layer Sequential model with random kernels, strides, dilations, paddings, groups and
    activations (None / relu), plus for each conv a replacement the planner may force on it."""
    h = int(rng.integers(6, 15))
    w = int(rng.integers(6, 15))
    c = int(rng.integers(1, 4))
    layers, forced = [keras.Input((h, w, c))], {}
    for i in range(int(rng.integers(1, 4))):
        k = int(rng.integers(1, 6))
        padding = "same" if rng.random() < 0.6 else "valid"
        if padding == "valid" and (h < k or w < k):
            padding = "same"
        stride = int(rng.integers(1, 3)) if rng.random() < 0.3 else 1
        dilation = int(rng.integers(2, 3)) if (stride == 1 and rng.random() < 0.2 and min(h, w) >= 2 * k) else 1
        # None or relu only: relu(c x) = c relu(x), so a normwise error stays normwise through it; a saturating
        # activation (tanh) at 1e30 turns the rounding error of values near 0 (1e24 there) into +-1 flips,
        # which is about comparing any two float implementations end to end, not about non-finite values.
        activation = [None, "relu"][int(rng.integers(0, 2))]
        name = f"c{i}"
        kind = rng.random()
        common = dict(kernel_size=k, padding=padding, strides=stride, dilation_rate=dilation, activation=activation,
                      use_bias=bool(rng.random() < 0.7), bias_initializer="random_normal", name=name)
        if kind < 0.3:
            layer = keras.layers.DepthwiseConv2D(depth_multiplier=int(rng.integers(1, 3)), **common)
            c = c * layer.depth_multiplier
            impls = ["fft", "fft-tiled"]
        elif kind < 0.6:
            m = int(rng.integers(1, 3))
            layer = keras.layers.Conv2D(c * m, groups=c, **common)
            impls = ["fft", "fft-tiled"] + (["depthwise"] if c > 1 and not (stride > 1 and dilation > 1) else [])
            c = c * m
        else:
            layer = keras.layers.Conv2D(int(rng.integers(1, 5)), **common)
            c = layer.filters
            impls = ["fft", "fft-tiled"]
        layers.append(layer)
        impl = impls[int(rng.integers(0, len(impls)))]
        forced[name] = (impl, {"tile_size": int(rng.integers(1, 6))} if impl == "fft-tiled" and rng.random() < 0.5 else {})
        eff = (k - 1) * dilation + 1
        if padding == "same":
            h, w = -(-h // stride), -(-w // stride)
        else:
            h, w = -(-(h - eff + 1) // stride), -(-(w - eff + 1) // stride)
    model = keras.Sequential(layers)
    for layer in model.layers:
        layer.set_weights([rng.standard_normal(v.shape).astype("float32") for v in layer.get_weights()])
    return model, forced


def _random_input(rng, shape):
    x = rng.standard_normal(shape).astype("float32")
    kind = rng.integers(0, 5)
    if kind == 0:  # clean
        return x
    if kind == 4:  # overflow range, finite
        return (x * np.float32(10.0 ** rng.integers(30, 39))).astype("float32")
    n = int(rng.integers(1, 4))
    for _ in range(n):
        idx = tuple(int(rng.integers(0, s)) for s in shape)
        x[idx] = [np.nan, np.inf, -np.inf][int(kind) - 1] if rng.random() < 0.7 else \
            [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
    if rng.random() < 0.3:
        x[..., 0] = np.float32(3e38)  # a whole channel at the edge of float32's range
    return x


def test_property_optimized_models_match_keras_pattern_for_pattern():
    rng = np.random.default_rng(20261127)
    for case in range(random_cases(24)):
        model, forced = _random_model(rng)
        fast = _forced(model, forced)
        kinds = {layer.name: type(layer).__name__ for layer in fast.layers}
        for _ in range(3):
            x = _random_input(rng, (int(rng.integers(1, 3)),) + tuple(model.inputs[0].shape[1:]))
            with np.errstate(all="ignore"):
                want = np.asarray(model(x))
                got = np.asarray(fast(x))
            where = f"case {case}: {forced} {kinds}"
            assert nonfinite_mismatches(got, want) == 0, where
            assert relative_error(got, want) <= 1e-4, where


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, "huge"])
def test_pac_replacements_follow_keras_pattern_for_pattern(rng, value):
    """PAC layers at conversion compute the convolution tap by tap, so non-finite values spread exactly to
    the windows that see them, as in Keras."""
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(4, 5, padding="same", name="a")(inp)
    h = keras.layers.Conv2D(2, 3, padding="valid", name="b")(h)
    m = keras.Model(inp, h)
    x = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    if value == "huge":
        # Overflow, made order-independent: every product of a huge value with 'a's (positive, >= 1.5) weights
        # overflows on its own, so 'a' gives +Inf exactly where a window sees the block, and 'b's mixed-sign
        # weights turn those into NaN or +/-Inf per window. (Sums that overflow only part-way depend on the
        # summation order, which differs between oneDNN runs, so they cannot be compared pattern for pattern.)
        a = m.get_layer("a")
        a.set_weights([np.abs(w) + 1.5 for w in a.get_weights()])
        x[0, 4:6, 4:6, :] = 3e38
    else:
        x[0, 4, 4, 1] = value
    fast = convrewrite.optimize(m, cost_model=None, pac={"layers": ["a", "b"]})
    assert {type(layer).__name__ for layer in fast.layers} >= {"PacConv2D"}
    with np.errstate(all="ignore"):
        assert _same_pattern(np.asarray(fast(x)), np.asarray(m(x))) <= 1e-4
