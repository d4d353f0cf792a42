"""Every replacement compiles under XLA and exports through Keras's own `model.export`, computing what the
original computes.

A small model holds one site of each kind (a 9x9 conv followed by BN, a 13x13 depthwise conv, a grouped 3x3
conv, a 3x13 separable conv, a 9x9 transposed conv with stride 2, a strided 3x3 conv); for each implementation, every site
it applies to is forced to it. The optimized model is then
- compiled with XLA: `model.compile(jit_compile=True)` then `predict` and one `fit` step (both backends), and
  `tf.function(jit_compile=True)` on TensorFlow;
- exported with `model.export(path, format="tf_saved_model")` (with and without `input_signature`; on JAX
  without only, for CI time), loaded
  back with `tf.saved_model.load`, and called;
and each output is compared with the original model's (float32: <= 1e-5 normwise), on random inputs and on
inputs holding a NaN or an Inf (the same NaN/Inf pattern as the original's).
"""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import registry
from conftest import BACKEND, rel_error

TOL = 1e-5
BATCH = 2
IMPLS = [name for name in registry.names() if not name.endswith("-bf16")]


def _model(grouped=True):
    x = keras.Input((16, 16, 4), batch_size=BATCH, name="image")
    y = keras.layers.Conv2D(6, 9, padding="same", name="c9")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.DepthwiseConv2D(13, padding="same", name="dw13")(y)
    if grouped:  # (Keras's grouped conv runs a nested tf.function, which tf2onnx cannot convert)
        y = keras.layers.Conv2D(6, 3, groups=6, padding="same", name="g3")(y)
    y = keras.layers.SeparableConv2D(6, (3, 13), padding="same", name="sep13")(y)
    y = keras.layers.Conv2DTranspose(4, 9, strides=2, padding="same", name="t9")(y)
    y = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="s3")(y)
    model = keras.Model(x, y)
    rng = np.random.default_rng(7)
    for w in model.weights:
        shape = tuple(w.shape)
        if "moving_variance" in w.path:
            w.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        else:
            w.assign((rng.standard_normal(shape) / np.sqrt(max(np.prod(shape[:-1]), 1))).astype("float32"))
    return model


@pytest.fixture(scope="module")
def original():
    return _model()


@pytest.fixture(scope="module")
def original_outputs(original, tmp_path_factory):
    """What the original computes on CASES in each runtime (computed once for all implementations)."""
    folder = tmp_path_factory.mktemp("original")
    reference = _model()  # compiled for XLA without touching the fixture
    reference.compile(jit_compile=True, loss="mse")
    runs = {"keras": original, "predict-xla": lambda x: reference.predict(x, batch_size=BATCH, verbose=0)}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        runs["tf.function-xla"] = tf.function(original, jit_compile=True)
    if _has_tensorflow():
        for i, signature in enumerate(SIGNATURES if BACKEND == "tensorflow" else SIGNATURES[:1]):
            runs[f"saved_model-{i}"] = _saved_model_runner(original, str(folder / str(i)), signature)
    return {name: [keras.ops.convert_to_numpy(run(x)) for x in CASES] for name, run in runs.items()}


def _has_tensorflow():
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _forced(model, impl):
    """The model optimized with `impl` on every site it applies to (None where it applies to none)."""
    plan = convrewrite.plan(model, cost_model=None)
    forced = [row.site for row in plan if registry.get(impl).applicable(row.spec)[0]]
    if not forced:
        return None
    for site in forced:
        plan.force(site, impl)
    fast = convrewrite.optimize(model, plan=plan, check_speed=False)
    assert fast.convrewrite_report.fallbacks == [], fast.convrewrite_report.fallbacks
    assert all(fast.convrewrite_plan.row(site).choice == impl for site in forced)
    return fast


def _inputs(seed, nonfinite=None):
    """Random inputs; nonfinite: a NaN or an Inf in the first image (its outputs then fill with NaN/Inf through
    the large kernels), the second image finite."""
    x = np.random.default_rng(seed).standard_normal((BATCH, 16, 16, 4)).astype("float32")
    if nonfinite is not None:
        x[0, 3, 5, 1] = nonfinite
    return x


CASES = [_inputs(1), _inputs(2, nonfinite=np.nan), _inputs(3, nonfinite=np.inf)]
SIGNATURES = (None, [keras.InputSpec(shape=(None, 16, 16, 4), dtype="float32")])


def _same(got, want, keras_eager):
    """got computes what `want` (the original in the same runtime) computes: the same values where both are
    finite, and the NaN/Inf pattern of either `want` or Keras's eager call (`keras_eager`): a runtime may
    depart from Keras on its own there (a SavedModel's fused conv + bias + ReLU turns ReLU(NaN) into 0),
    and a replacement that keeps Keras's pattern is not wrong for it."""
    got, want, keras_eager = (np.asarray(a) for a in (got, want, keras_eager))
    assert got.shape == want.shape
    pattern = (np.isnan(got), np.isinf(got))
    assert any(np.array_equal(pattern[0], np.isnan(w)) and np.array_equal(pattern[1], np.isinf(w))
               for w in (want, keras_eager)), "NaN/Inf pattern differs from the original's"
    finite = np.isfinite(got) & np.isfinite(want)
    assert finite.any()
    assert rel_error(np.where(finite, got, 0.0), np.where(finite, want, 0.0)) <= TOL


def _saved_model_runner(model, path, signature):
    import tensorflow as tf

    model.export(path, format="tf_saved_model", input_signature=signature, verbose=False)
    loaded = tf.saved_model.load(path)
    return lambda x: loaded.serve(x)  # holds `loaded`: its variables go with it (TF: "referencing deleted variables")


@pytest.mark.parametrize("impl", IMPLS)
def test_compiles_under_xla_and_exports_to_saved_model(impl, original, original_outputs, tmp_path):
    """Each runtime is compared with the original run the same way (see `_same`)."""
    fast = _forced(original, impl)
    if fast is None:
        pytest.skip(f"{impl} applies to no site of the model")

    def compare(name, run_fast):
        for x, want, keras_eager in zip(CASES, original_outputs[name], original_outputs["keras"]):
            _same(keras.ops.convert_to_numpy(run_fast(x)), want, keras_eager)

    fast.compile(jit_compile=True, loss="mse")
    compare("predict-xla", lambda x: fast.predict(x, batch_size=BATCH, verbose=0))
    history = fast.fit(CASES[0], original_outputs["keras"][0] * 0.5, batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    fast = _forced(original, impl)  # fit changed the weights: compare a fresh copy from here on

    if BACKEND == "tensorflow":
        import tensorflow as tf

        compare("tf.function-xla", tf.function(fast, jit_compile=True))
    if not _has_tensorflow():
        pytest.skip("SavedModel export needs TensorFlow installed")
    for i, signature in enumerate(SIGNATURES if BACKEND == "tensorflow" else SIGNATURES[:1]):  # (CI time on JAX)
        compare(f"saved_model-{i}", _saved_model_runner(fast, str(tmp_path / str(i)), signature))


@pytest.mark.tensorflow_only("the spectrum cache's variables exist on TensorFlow only")
@pytest.mark.parametrize("how", ["model.export", "ExportArchive"])
def test_an_export_holds_kernel_spectra_as_constants_not_the_cache(how, original, tmp_path):
    """The exported function reads the model's weights and nothing else: no spectrum-cache variable (the
    transforms are constants computed at export, from the kernels as they are then), so a runtime without
    variable assignment can take it; and a kernel changed before the export is the one it computes with."""
    import tensorflow as tf

    fast = _forced(original, "fft")
    fast(CASES[0])  # fills the caches
    layer = fast.get_layer("c9")
    layer.kernel.assign(layer.kernel * 2.0)  # the cached spectrum no longer matches this kernel
    want = keras.ops.convert_to_numpy(fast(CASES[0]))
    path = str(tmp_path / "sm")
    if how == "model.export":
        fast.export(path, format="tf_saved_model", verbose=False)
    else:
        archive = keras.export.ExportArchive()
        archive.track(fast)
        archive.add_endpoint("serve", fast.call, input_signature=[keras.InputSpec(shape=(BATCH, 16, 16, 4), dtype="float32")])
        archive.write_out(path, verbose=False)
    loaded = tf.saved_model.load(path)
    read = {v.name.split(":")[0] for v in loaded.serve.concrete_functions[0].variables}
    assert read and read <= {w.path for w in fast.weights}, sorted(read - {w.path for w in fast.weights})
    assert rel_error(loaded.serve(CASES[0]), want) <= TOL


RUNTIME_CELLS = [(impl, fmt) for impl in IMPLS for fmt in ("onnx", "openvino", "litert")
                 if fmt in registry.get(impl).export_formats]


@pytest.mark.tensorflow_only("Keras writes these formats through TensorFlow's converters; one backend suffices")
@pytest.mark.parametrize("impl,fmt", RUNTIME_CELLS, ids=[f"{i}-{f}" for i, f in RUNTIME_CELLS])
def test_export_formats_an_implementation_claims_hold_in_their_runtime(impl, fmt, tmp_path):
    """`Implementation.export_formats` is what a plan for a format may choose from: each claim is exported
    here, run in that runtime (OpenVINO at float32), and compared with Keras's original on finite inputs (the
    original itself does not always export: tf2onnx cannot convert Keras's grouped conv, which the model
    here leaves out)."""
    from convrewrite import export

    if export.missing_packages(fmt):
        pytest.skip(f"{fmt} needs {', '.join(export.missing_packages(fmt))} (pip install -e '.[export]')")
    original = _model(grouped=False)
    fast = _forced(original, impl)
    if fast is None:
        pytest.skip(f"{impl} applies to no site of the model")
    got = export.load_runner(export.export_model(fast, tmp_path, fmt), fmt, n_outputs=1)(CASES[0])
    assert export.compare_outputs(got, [keras.ops.convert_to_numpy(original(CASES[0]))], TOL) is None
