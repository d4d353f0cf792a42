"""Conv1D / DepthwiseConv1D sites: the height-1 specs, the numpy reference against Keras, the FFT layers
(randomized configurations against the float64 reference, causal padding, tiling, cache, gradients, fit,
.keras round trip, mixed precision, non-finite inputs) and the whole path through plan / optimize."""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations, reference
from convrewrite.layers import FFTConv1D, FFTDepthwiseConv1D
from convrewrite.layers import fft1d
from convrewrite.spec import ConvSpec, spec_from_layer

from convrewrite.timing import compiled
from conftest import gradients, random_cases, rel_error

TOL = 1e-5


# ---- specs ------------------------------------------------------------------------------------------
def test_spec_from_conv1d_layers():
    conv = keras.layers.Conv1D(16, 251, padding="causal", dilation_rate=2, groups=4, activation="relu")
    spec = spec_from_layer(conv, (8, 16000, 16))
    assert spec.kind == "conv1d" and spec.is_1d
    assert (spec.height, spec.width, spec.kernel, spec.dilation, spec.groups) == (1, 16000, (1, 251), (1, 2), 4)
    assert spec.output_hw() == (1, 16000)  # causal keeps the length
    assert spec.macs() == 8 * 16000 * 16 * 4 * 251
    assert spec.short() == "conv1d g4 k251 s1 d2 causal 16->16 @16000"
    assert ConvSpec.from_json(spec.to_json()) == spec
    dw = keras.layers.DepthwiseConv1D(1024, depth_multiplier=2, strides=2, padding="same",
                                      data_format="channels_first")
    spec = spec_from_layer(dw, (None, 64, None))
    assert (spec.kind, spec.filters, spec.groups, spec.width, spec.strides) == ("depthwise_conv1d", 128, 64, None, (1, 2))
    assert spec.short() == "dw1d k1024 s2 same 64->128 @?" and spec.is_depthwise_like
    assert ConvSpec.from_json(spec.to_json()) == spec
    # 2-D kinds keep refusing causal; a 1-D kind must be height 1
    with pytest.raises(ValueError, match="padding"):
        ConvSpec("conv2d", 2, 2, (3, 3), 8, 8, padding="causal")
    with pytest.raises(ValueError, match="height"):
        ConvSpec("conv1d", 2, 2, (1, 3), 8, 8)
    with pytest.raises(ValueError, match=r"expected \(1, n\)"):
        ConvSpec("conv1d", 2, 2, (3, 3), 1, 8)


def test_plan_lists_1d_sites():
    inp = keras.Input((512, 4))
    h = keras.layers.Conv1D(8, 63, padding="causal", name="c1")(inp)
    h = keras.layers.DepthwiseConv1D(101, padding="same", name="dw1")(h)
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, name="c2")(keras.layers.Reshape((512, 8, 1))(h)))
    plan = convrewrite.plan(model, cost_model=None)
    kinds = {row.site: row.spec.kind for row in plan.rows}
    assert kinds == {"c1": "conv1d", "dw1": "depthwise_conv1d", "c2": "conv2d"}
    assert plan.row("c1").spec.padding == "causal" and plan.row("dw1").spec.width == 512


# ---- numpy reference vs Keras ------------------------------------------------------------------------
def _random_1d_config(rng, depthwise):
    k = int(rng.integers(1, 12))
    dilation = int(rng.choice([1, 1, 2, 3]))
    strides = int(rng.choice([1, 1, 2, 3])) if dilation == 1 else 1
    paddings = ["same", "valid"] + ([] if depthwise else ["causal"])
    padding = str(rng.choice(paddings))
    k_eff = (k - 1) * dilation + 1
    n = int(rng.integers(k_eff if padding == "valid" else 1, max(k_eff, 40) + 1))
    data_format = "channels_first" if rng.random() < 0.25 else "channels_last"
    common = dict(kernel_size=k, strides=strides, dilation_rate=dilation, padding=padding,
                  use_bias=bool(rng.random() < 0.7), data_format=data_format, bias_initializer="random_normal")
    if depthwise:
        cin = int(rng.integers(1, 5))
        cls, fcls = keras.layers.DepthwiseConv1D, FFTDepthwiseConv1D
        kwargs = dict(depth_multiplier=int(rng.integers(1, 4)), **common)
    else:
        groups = int(rng.choice([1, 1, 2, 3]))
        cin = groups * int(rng.integers(1, 4))
        cls, fcls = keras.layers.Conv1D, FFTConv1D
        kwargs = dict(filters=groups * int(rng.integers(1, 4)), groups=groups, **common)
    tile = [None, "full", int(rng.integers(1, 12))][int(rng.integers(0, 3))]
    batch = int(rng.integers(1, 4))
    shape = (batch, cin, n) if data_format == "channels_first" else (batch, n, cin)
    return cls, fcls, kwargs, shape, tile


def _build(rng, cls, kwargs, shape):
    layer = cls(**kwargs)
    layer.build(shape)
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    return layer


def _keras_channels_last(layer, x):
    """Keras's output for `layer` on x, computed by a channels_last twin when the layer is channels_first.

    TF's CPU kernels return wrong values for some channels_first convolutions Keras accepts (e.g. a grouped
    Conv1D(2, 8, groups=2, dilation_rate=3, data_format="channels_first") on (1, 6, 23) is 0.8 off, its
    channels_last twin on the transposed input agrees with the reference to 1e-6; see tests/test_fft.py)."""
    if layer.data_format != "channels_first":
        return np.asarray(layer(x))
    twin = type(layer).from_config({**layer.get_config(), "data_format": "channels_last"})
    twin.build((x.shape[0], x.shape[2], x.shape[1]))
    twin.set_weights(layer.get_weights())
    return np.asarray(twin(x.transpose(0, 2, 1))).transpose(0, 2, 1)


def test_reference_matches_keras_layers():
    """The float64 numpy oracle equals Keras's own Conv1D / DepthwiseConv1D on 40 random configurations
    (channels_first ones through Keras's channels_last twin, see `_keras_channels_last`)."""
    rng = np.random.default_rng(7)
    for i in range(40):
        cls, _, kwargs, shape, _ = _random_1d_config(rng, depthwise=bool(i % 2))
        layer = _build(rng, cls, kwargs, shape)
        x = rng.standard_normal(shape).astype("float32")
        want = reference.spec_forward(spec_from_layer(layer, shape), x, layer.get_weights())
        assert rel_error(_keras_channels_last(layer, x), want) <= TOL, str((kwargs, shape))


def test_causal_reference_only_looks_back():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 30, 2))
    k = rng.standard_normal((5, 2, 3))
    y = reference.conv1d(x, k, padding="causal", dilation=2)
    x2 = x.copy()
    x2[:, 20:] = 100.0  # the future changes, the past outputs do not
    np.testing.assert_array_equal(reference.conv1d(x2, k, padding="causal", dilation=2)[:, :20], y[:, :20])


# ---- FFT layers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("depthwise", [False, True])
def test_random_configs_match_reference_and_keras(depthwise):
    """40 seeded random configurations per layer (groups, multiplier, strides, dilation, same / valid /
    causal, both data formats, full and tiled): FFT output within 1e-5 of the float64 reference and of Keras."""
    rng = np.random.default_rng(2024 + depthwise)
    for i in range(random_cases(40)):
        cls, fcls, kwargs, shape, tile = _random_1d_config(rng, depthwise)
        original = _build(rng, cls, kwargs, shape)
        layer = fcls(**original.get_config(), tile_size=tile)
        layer.build(shape)
        layer.set_weights(original.get_weights())
        x = rng.standard_normal(shape).astype("float32")
        got = np.asarray(layer(x))
        where = f"config {i}: {fcls.__name__}({kwargs}, tile_size={tile}) on {shape}"
        want = reference.spec_forward(spec_from_layer(original, shape), x, original.get_weights())
        assert rel_error(got, want) <= TOL, where
        assert rel_error(got, _keras_channels_last(original, x)) <= TOL, where
        if rel_error(np.asarray(original(x)), want) <= TOL:  # Keras itself, where TF computes it right
            assert rel_error(got, np.asarray(original(x))) <= TOL, where


def test_axis_layouts():
    full = fft1d.axis_layout_1d(100, 11, 1, "causal", "full")
    assert full.pad_before == 10 and full.out == 100 and full.fft >= 110
    tiled = fft1d.axis_layout_1d(10000, 11, 1, "causal", 50)
    assert tiled.tile == tiled.fft - 10 and tiled.pad_before == 10 and tiled.out == 10000
    assert fft1d.axis_layout_1d(None, 31, 1, "same", None).tile is not None  # unknown length: tiled
    assert fft1d.axis_layout_1d(64, 31, 1, "same", None).tile is None  # short: one transform
    with pytest.raises(ValueError, match="unknown"):
        fft1d.axis_layout_1d(None, 3, 1, "valid", "full")
    with pytest.raises(ValueError, match="tile_size"):
        FFTConv1D(4, 3, tile_size=0)


def test_unknown_length_and_other_length_than_built(rng):
    conv = keras.layers.Conv1D(3, 9, padding="causal")
    inp = keras.Input((None, 2))
    fast = FFTConv1D(3, 9, padding="causal")
    model, ref = keras.Model(inp, fast(inp)), keras.Model(inp, conv(inp))
    fast.set_weights([rng.standard_normal(w.shape).astype("float32") for w in fast.get_weights()])
    conv.set_weights(fast.get_weights())
    assert fast.fft_layout.tile is not None
    for n in (5, 40, 333):
        x = rng.standard_normal((2, n, 2)).astype("float32")
        assert rel_error(model.predict(x, verbose=0), ref.predict(x, verbose=0)) <= TOL
    full = FFTConv1D(3, 9, padding="same", tile_size="full")
    full.build((1, 50, 2))
    full.set_weights(conv.get_weights())
    x = rng.standard_normal((1, 77, 2)).astype("float32")  # full mode on another length: correct, uncached
    assert rel_error(full(x), reference.conv1d(x, *conv.get_weights(), padding="same")) <= TOL


@pytest.mark.tensorflow_only("spectra are cached between calls on TensorFlow; JAX recomputes them in each call")
@pytest.mark.parametrize("depthwise", [False, True])
def test_cache_reused_and_never_stale(rng, depthwise):
    cls, fcls = (keras.layers.DepthwiseConv1D, FFTDepthwiseConv1D) if depthwise else (keras.layers.Conv1D, FFTConv1D)
    kwargs = dict(kernel_size=21, padding="same") if depthwise else dict(filters=4, kernel_size=21, padding="causal")
    conv = _build(rng, cls, kwargs, (2, 64, 3))
    layer = fcls(**conv.get_config())
    layer.build((2, 64, 3))
    layer.set_weights(conv.get_weights())
    x = rng.standard_normal((2, 64, 3)).astype("float32")
    assert rel_error(layer(x), conv(x)) <= TOL
    cache = layer._spectrum_cache
    assert bool(cache.valid.numpy())
    cache.value.assign(cache.value * 2)  # corrupted behind the key's back: the cached value is what is used
    assert rel_error(layer(x), conv(x)) > 0.1
    new = [rng.standard_normal(w.shape).astype("float32") for w in conv.get_weights()]
    layer.set_weights(new)
    conv.set_weights(new)
    assert rel_error(layer(x), conv(x)) <= TOL


@pytest.mark.parametrize("training", [True, None])
@pytest.mark.parametrize("depthwise", [False, True])
def test_gradients_match(rng, training, depthwise):
    if depthwise:
        conv = _build(rng, keras.layers.DepthwiseConv1D, dict(kernel_size=13, depth_multiplier=2, padding="same",
                                                               strides=2), (2, 40, 3))
        layer = FFTDepthwiseConv1D(**conv.get_config())
    else:
        conv = _build(rng, keras.layers.Conv1D, dict(filters=6, kernel_size=13, padding="causal", dilation_rate=2,
                                                     groups=3, activation="tanh"), (2, 40, 3))
        layer = FFTConv1D(**conv.get_config(), tile_size=8)
    layer.build((2, 40, 3))
    layer.set_weights(conv.get_weights())
    x = rng.standard_normal((2, 40, 3)).astype("float32")
    target = rng.standard_normal(conv(x).shape).astype("float32")

    def grads(lyr):
        return gradients(lambda t: lyr(t, training=training) * target, x, lyr.trainable_weights)

    def grads_compiled(lyr):
        return compiled(lambda: grads(lyr), [lyr])()

    layer(x)  # fill the cache: the inference path takes the cached branch
    for fn in (grads, grads_compiled):
        for g, w in zip(fn(layer), fn(conv)):
            assert g is not None and rel_error(g, w) <= TOL


def test_fit_matches_conv1d_training(rng):
    inp = keras.Input((32, 2))
    conv, fast = keras.layers.Conv1D(3, 11, padding="causal"), FFTConv1D(3, 11, padding="causal")
    ref, model = keras.Model(inp, conv(inp)), keras.Model(inp, fast(inp))
    fast.set_weights(conv.get_weights())
    x = rng.standard_normal((4, 32, 2)).astype("float32")
    y = rng.standard_normal((4, 32, 3)).astype("float32")
    for m in (model, ref):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        m.fit(x, y, epochs=2, batch_size=2, shuffle=False, verbose=0)
    for a, b in zip(fast.get_weights(), conv.get_weights()):
        assert rel_error(a, b) <= 1e-5
    assert rel_error(model(x), ref(x)) <= TOL  # after training: the cache follows the new kernel


def test_keras_file_round_trip(rng, tmp_path):
    inp = keras.Input((50, 3))
    h = FFTConv1D(4, 17, padding="causal", tile_size=16, name="c")(inp)
    model = keras.Model(inp, FFTDepthwiseConv1D(9, depth_multiplier=2, padding="same", name="dw")(h))
    for layer in model.layers[1:]:
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    x = rng.standard_normal((2, 50, 3)).astype("float32")
    y = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("c")).__name__ == "FFTConv1D" and loaded.get_layer("c").tile_size == 16
    assert type(loaded.get_layer("dw")).__name__ == "FFTDepthwiseConv1D"
    assert rel_error(loaded.predict(x, verbose=0), y) <= TOL


def test_mixed_precision(rng):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        conv = keras.layers.Conv1D(4, 31, padding="same")
        conv.build((2, 64, 3))
        conv.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.1 for w in conv.get_weights()])
        layer = FFTConv1D(**conv.get_config())
        layer.build((2, 64, 3))
        layer.set_weights(conv.get_weights())
        x = rng.standard_normal((2, 64, 3)).astype("float32")
        got = np.asarray(layer(x))
        assert got.dtype == np.float16 and np.asarray(layer.kernel).dtype == np.float32
        exact = reference.conv1d(x.astype(np.float16).astype(np.float64), *conv.get_weights(), padding="same")
        assert rel_error(got, conv(x)) <= 1e-2
        assert rel_error(got, exact) <= rel_error(conv(x), exact)
    finally:
        keras.config.set_dtype_policy(previous)


def test_nonfinite_inputs_give_keras_result(rng):
    """One NaN / Inf, or a value that would overflow the transform, takes Keras's own computation for that
    call: NaN and Inf exactly where Keras puts them (an FFT would spread them over the whole output)."""
    conv = _build(rng, keras.layers.Conv1D, dict(filters=2, kernel_size=7, padding="causal"), (1, 40, 2))
    layer = FFTConv1D(**conv.get_config())
    layer.build((1, 40, 2))
    layer.set_weights(conv.get_weights())
    for bad in (np.nan, np.inf, 3e38):
        x = rng.standard_normal((1, 40, 2)).astype("float32")
        x[0, 20, 1] = bad
        got, want = np.asarray(layer(x)), np.asarray(conv(x))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        assert np.all(np.isfinite(got[0, :20]))  # causal: the outputs before it never see it
        fin = np.isfinite(want)
        assert rel_error(got[fin], want[fin]) <= TOL


# ---- registry, plan, optimize -----------------------------------------------------------------------------
def test_registry_entries(rng):
    spec = spec_from_layer(keras.layers.Conv1D(8, 101, padding="causal"), (2, 4096, 4))
    dw_spec = spec_from_layer(keras.layers.DepthwiseConv1D(255), (2, None, 4))
    fft, tiled, direct = (implementations.get(n) for n in ("fft", "fft-tiled", "direct"))
    assert fft.applicable(spec) == (True, "") and tiled.applicable(spec) == (True, "")
    assert direct.applicable(spec) == (True, "") and direct.applicable(dw_spec) == (True, "")
    assert fft.applicable(dw_spec)[0] is False and tiled.applicable(dw_spec) == (True, "")
    assert implementations.get("depthwise").applicable(spec)[0] is False
    f = tiled.features(spec)
    assert f["fft_h"] == 1 and f["tiles"] > 1 and f["bins"] == f["fft_w"] // 2 + 1
    assert fft.features(spec)["fft_w"] >= 4096 + 100 and fft.expected_error(spec) < 1e-5
    assert direct.features(dw_spec.with_input(width=512))["dw_macs"] > 0
    assert fft.workspace_bytes(spec) > 0
    conv = keras.layers.Conv1D(8, 101, padding="causal", name="long")
    conv.build((2, 4096, 4))
    for which, options in ((fft, {}), (tiled, {"tile_size": (1, 300)}), (tiled, {})):
        new = which.make_layer(conv, spec, **options)
        assert isinstance(new, FFTConv1D) and new.name == "long" and not new.built
        new.build((2, 4096, 4))
        which.transfer_weights(conv, new, spec)
        x = rng.standard_normal((2, 4096, 4)).astype("float32")
        assert rel_error(new(x), conv(x)) <= TOL
        assert implementations.for_layer(new).name == "fft"
        back = direct.make_layer(new, spec)
        assert type(back) is keras.layers.Conv1D


def test_optimize_with_forced_fft_plan(rng):
    """End to end: a Conv1D model with its convs forced to FFT is equivalent, verified per site and overall."""
    inp = keras.Input((300, 3))
    h = keras.layers.Conv1D(8, 63, padding="causal", activation="relu", name="long")(inp)
    h = keras.layers.DepthwiseConv1D(101, padding="same", depth_multiplier=2, name="dw")(h)
    h = keras.layers.Conv1D(4, 9, strides=2, groups=2, name="strided")(h)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling1D()(h))
    plan = convrewrite.plan(model, cost_model=None)
    assert {r.spec.kind for r in plan.rows} == {"conv1d", "depthwise_conv1d"}
    plan.force("long", "fft").force("dw", "fft-tiled", tile_size=40).force("strided", "fft")
    fast = convrewrite.optimize(model, plan=plan)
    kinds = {layer.name: type(layer).__name__ for layer in fast.layers}
    assert kinds["long"] == "FFTConv1D" and kinds["dw"] == "FFTDepthwiseConv1D" and kinds["strided"] == "FFTConv1D"
    x = rng.standard_normal((2, 300, 3)).astype("float32")
    assert rel_error(fast.predict(x, verbose=0), model.predict(x, verbose=0)) <= TOL
    report = convrewrite.verify(model, fast)
    assert report.passed


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class _SeqBlock(keras.layers.Layer):
    """A custom layer holding a causal Conv1D and a DepthwiseConv1D in attributes (a residual sequence block)."""

    def __init__(self, channels=4, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.mix = keras.layers.Conv1D(channels, 33, padding="causal")
        self.long = keras.layers.DepthwiseConv1D(65, padding="same")

    def call(self, x):
        return x + self.long(self.mix(x))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


def test_convs_held_in_a_custom_layer_are_sites_and_swapped(rng):
    inputs = keras.Input((200, 4))
    model = keras.Model(inputs, _SeqBlock(4, name="blk")(inputs))
    for w in model.weights:
        w.assign(rng.standard_normal(w.shape).astype("float32") * 0.2)
    x = rng.standard_normal((2, 200, 4)).astype("float32")
    plan = convrewrite.plan(model, cost_model=None)
    assert {r.site: r.spec.kind for r in plan.rows} == {"blk/mix": "conv1d", "blk/long": "depthwise_conv1d"}
    fast = convrewrite.optimize(model, plan=plan.force("blk/mix", "fft").force("blk/long", "fft-tiled"), inputs=x)
    blk = fast.get_layer("blk")
    assert type(blk.mix).__name__ == "FFTConv1D" and type(blk.long).__name__ == "FFTDepthwiseConv1D"
    assert rel_error(keras.ops.convert_to_numpy(fast(x)), keras.ops.convert_to_numpy(model(x))) <= TOL
    assert fast.convrewrite_report.passed
