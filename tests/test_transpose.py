"""Conv2DTranspose as a conv site: its ConvSpec, the float64 oracle, and SubpixelConv2DTranspose (the sub-pixel
decomposition by Keras's conv or by FFT) with the subpixel / subpixel-fft implementations.

Seeded random configurations (kernel, strides, padding, output_padding, dilation, data format) against
`reference.conv2d_transpose`; NaN/Inf positions, gradients and mixed precision against Keras's own layer;
config and .keras round trips; planning and optimize() on a small decoder.
"""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations, reference
from convrewrite.layers.transpose import SubpixelConv2DTranspose, phase_axis
from convrewrite.spec import ConvSpec, spec_from_layer
from convrewrite.timing import compiled
from conftest import BACKEND, gradients, random_cases, rel_error

TOL = 1e-5


def _random_config(rng):
    k = int(rng.integers(1, 7))
    s = int(rng.integers(1, 4))
    d = int(rng.integers(1, 3)) if s == 1 else 1
    op = None
    if rng.random() < 0.4:
        op = int(rng.integers(0, s))
    if op == 0 and k % 2 == 0:
        op = None  # SAME with an even kernel and output_padding 0 has no output (Keras refuses it): tested below
    return dict(kernel_size=k, strides=s, dilation_rate=d, output_padding=op,
                padding=str(rng.choice(["same", "valid"])), use_bias=bool(rng.random() < 0.8),
                activation=str(rng.choice(["linear", "relu"])))


def _randomize(layer, rng):
    layer.set_weights([rng.standard_normal(v.shape).astype("float32") for v in layer.get_weights()])


def _keras_runs(layer, x):
    layer(x)
    return True


def test_output_padding_without_an_output_is_refused(rng):
    # Keras's own layer fails at call (TF refuses the output shape); ours says why at build, and the
    # implementations do not apply
    x = rng.standard_normal((1, 5, 5, 2)).astype("float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with pytest.raises(tf.errors.OpError):
            keras.layers.Conv2DTranspose(3, 4, strides=2, padding="same", output_padding=0)(x)
    with pytest.raises(ValueError, match="output_padding"):
        SubpixelConv2DTranspose(3, 4, strides=2, padding="same", output_padding=0)(x)
    spec = ConvSpec(kind="conv2d_transpose", in_channels=2, filters=3, kernel=4, strides=2, padding="same",
                    output_padding=0, height=5, width=5)
    assert not implementations.get("subpixel").applicable(spec)[0]


def test_spec_describes_the_layer_and_round_trips(rng):
    for _ in range(12):
        config = _random_config(rng)
        layer = keras.layers.Conv2DTranspose(3, **config)
        x = rng.standard_normal((2, 5, 6, 2)).astype("float32")
        if not _keras_runs(layer, x):
            continue
        spec = spec_from_layer(layer, x.shape)
        assert spec.kind == "conv2d_transpose" and spec.filters == 3 and spec.in_channels == 2
        assert spec.output_hw() == tuple(layer(x).shape[1:3])
        assert spec.macs() == 2 * 5 * 6 * 2 * 3 * config["kernel_size"] ** 2
        assert ConvSpec.from_json(spec.to_json()) == spec
        assert spec.short().startswith("convT ")
        if config["output_padding"] is not None:
            assert "op" in spec.short() and "output_padding" in spec.to_dict()


def test_older_kinds_serialize_as_before():
    spec = ConvSpec(kind="conv2d", in_channels=3, filters=4, kernel=3, height=8, width=8)
    assert "output_padding" not in spec.to_dict()
    with pytest.raises(ValueError, match="output_padding"):
        ConvSpec(kind="conv2d", in_channels=3, filters=4, kernel=3, output_padding=1)


def test_reference_matches_keras(rng):
    checked = 0
    for _ in range(25):
        config = _random_config(rng)
        layer = keras.layers.Conv2DTranspose(4, **config)
        x = rng.standard_normal((2, int(rng.integers(1, 7)), int(rng.integers(1, 7)), 3)).astype("float32")
        if not _keras_runs(layer, x):
            continue
        _randomize(layer, rng)
        want = reference.spec_forward(spec_from_layer(layer, x.shape), x, layer.get_weights())
        assert rel_error(layer(x), want) <= TOL, config
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("method", ["conv", "fft"])
def test_random_configs_match_reference(method):
    rng = np.random.default_rng(5 if method == "conv" else 6)
    for _ in range(random_cases(20)):
        config = _random_config(rng)
        cf = rng.random() < 0.3
        h, w = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        x = rng.standard_normal((2, 3, h, w) if cf else (2, h, w, 3)).astype("float32")
        layer = SubpixelConv2DTranspose(4, **config, method=method,
                                        data_format="channels_first" if cf else "channels_last")
        layer(x)
        _randomize(layer, rng)
        want = reference.spec_forward(spec_from_layer(layer, x.shape), x, layer.get_weights(),
                                      activation=layer.activation)
        assert rel_error(layer(x), want) <= TOL, (config, cf)
        assert rel_error(compiled(layer, [layer])(x), want) <= TOL, (config, cf)


def test_phase_axis_is_independent_of_the_input_length():
    # pb and the end cut hold for every input length: compare with the oracle's crop at several lengths
    for k, s, pad, op in [(4, 2, "same", None), (3, 2, "same", 1), (5, 3, "valid", 2), (2, 2, "valid", None)]:
        j, _, pb, cut = phase_axis(k, s, 1, pad, op)
        for n in (1, 4, 9):
            full = (n + j - 1) * s
            length = reference.conv2d_transpose_length(n, k, s, pad, op)
            assert full - pb - cut == length


def test_unknown_spatial_size(rng):
    inp = keras.Input((None, None, 3))
    layer = SubpixelConv2DTranspose(2, 3, strides=2, padding="same", output_padding=1, method="fft")
    model = keras.Model(inp, layer(inp))
    _randomize(layer, rng)
    for h, w in ((5, 7), (8, 3)):
        x = rng.standard_normal((1, h, w, 3)).astype("float32")
        want = reference.conv2d_transpose(x, *layer.get_weights(), strides=2, padding="same", output_padding=1)
        assert rel_error(model(x), want) <= TOL


@pytest.mark.parametrize("method", ["conv", "fft"])
@pytest.mark.parametrize("kernel", [3, 4])  # 3 at stride 2 has zero sub-kernel taps, 4 has none
def test_nonfinite_inputs_propagate_like_keras(rng, method, kernel):
    config = dict(filters=3, kernel_size=kernel, strides=2, padding="same")
    keras_layer = keras.layers.Conv2DTranspose(**config)
    layer = SubpixelConv2DTranspose(**config, method=method)
    x = rng.standard_normal((1, 6, 6, 2)).astype("float32")
    keras_layer(x), layer(x)
    _randomize(keras_layer, rng)
    layer.set_weights(keras_layer.get_weights())
    x[0, 2, 3, 1], x[0, 5, 0, 0] = np.nan, np.inf
    want, got = np.asarray(keras_layer(x)), np.asarray(layer(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert rel_error(got[finite], want[finite]) <= TOL


@pytest.mark.parametrize("method", ["conv", "fft"])
def test_nonfinite_kernel_propagates_like_keras(rng, method):
    config = dict(filters=3, kernel_size=4, strides=2, padding="same")
    keras_layer = keras.layers.Conv2DTranspose(**config)
    layer = SubpixelConv2DTranspose(**config, method=method)
    x = rng.standard_normal((1, 5, 5, 2)).astype("float32")
    keras_layer(x), layer(x)
    weights = [rng.standard_normal(v.shape).astype("float32") for v in keras_layer.get_weights()]
    weights[0][0, 3, 1, 0] = np.nan
    keras_layer.set_weights(weights)
    layer.set_weights(weights)
    want, got = np.asarray(keras_layer(x)), np.asarray(layer(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("method", ["conv", "fft"])
def test_gradients_match_keras(rng, method):
    config = dict(filters=3, kernel_size=3, strides=2, padding="same", output_padding=1, activation="tanh")
    keras_layer = keras.layers.Conv2DTranspose(**config)
    layer = SubpixelConv2DTranspose(**config, method=method)
    x = rng.standard_normal((2, 5, 4, 2)).astype("float32")
    keras_layer(x), layer(x)
    _randomize(keras_layer, rng)
    layer.set_weights(keras_layer.get_weights())
    grads = []
    for lay in (keras_layer, layer):
        grads.append(gradients(lambda t, lay=lay: lay(t, training=True) ** 2, x, lay.trainable_variables))
    for got, want in zip(grads[1], grads[0]):
        assert rel_error(got, want) <= TOL


def test_config_and_keras_file_round_trip(rng, tmp_path):
    inp = keras.Input((6, 5, 3))
    layer = SubpixelConv2DTranspose(4, 4, strides=2, padding="same", method="fft", name="up")
    model = keras.Model(inp, layer(inp))
    _randomize(layer, rng)
    assert SubpixelConv2DTranspose.from_config(layer.get_config()).method == "fft"
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = rng.standard_normal((2, 6, 5, 3)).astype("float32")
    assert type(loaded.get_layer("up")) is SubpixelConv2DTranspose
    np.testing.assert_allclose(loaded(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        SubpixelConv2DTranspose(4, 3, method="winograd")


def test_mixed_precision_matches_keras(rng):
    config = dict(filters=4, kernel_size=4, strides=2, padding="same", dtype="mixed_bfloat16")
    keras_layer = keras.layers.Conv2DTranspose(**config)
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    keras_layer(x)
    _randomize(keras_layer, rng)
    want = np.asarray(keras_layer(x), np.float32)
    for method in ("conv", "fft"):
        layer = SubpixelConv2DTranspose(**config, method=method)
        layer(x)
        layer.set_weights(keras_layer.get_weights())
        got = layer(x)
        assert got.dtype == keras_layer(x).dtype
        assert rel_error(np.asarray(got, np.float32), want) <= 3e-2


def _decoder():
    inp = keras.Input((8, 8, 6))
    y = keras.layers.Conv2D(6, 3, padding="same", name="enc")(inp)
    y = keras.layers.Conv2DTranspose(4, 4, strides=2, padding="same", name="up4")(y)
    y = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", output_padding=1, activation="relu",
                                     name="up3")(y)
    return keras.Model(inp, y)


def test_plan_lists_transposed_convs_as_sites_and_optimize_forces_them(rng):
    model = _decoder()
    plan = convrewrite.plan(model)
    assert {r.site for r in plan.rows} >= {"up4", "up3"}
    row = next(r for r in plan.rows if r.site == "up4")
    assert row.spec.kind == "conv2d_transpose"
    for forced in ("subpixel", "subpixel-fft", "direct"):
        new = convrewrite.optimize(model, plan=plan.force("up4", forced).force("up3", forced))
        assert new.convrewrite_report.passed
        x = rng.standard_normal((2, 8, 8, 6)).astype("float32")
        assert rel_error(new(x), model(x)) <= TOL
        want = SubpixelConv2DTranspose if forced != "direct" else keras.layers.Conv2DTranspose
        assert type(new.get_layer("up4")) is want
    impl = implementations.get("subpixel")
    assert not impl.applicable(ConvSpec(kind="conv2d", in_channels=2, filters=2, kernel=3))[0]
    assert not implementations.get("fft").applicable(row.spec)[0]


def test_fit_trains_the_replacement(rng):
    model = _decoder()
    plan = convrewrite.plan(model).force("up4", "subpixel").force("up3", "subpixel-fft")
    new = convrewrite.optimize(model, plan=plan)
    new.compile(optimizer="sgd", loss="mse")
    x = rng.standard_normal((4, 8, 8, 6)).astype("float32")
    y = rng.standard_normal((4, 32, 32, 3)).astype("float32")
    before = new.get_layer("up3").get_weights()[0].copy()
    new.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(before, new.get_layer("up3").get_weights()[0])
