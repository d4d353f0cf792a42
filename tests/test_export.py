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


_RUNTIME_ORIGINALS = {}


def _in_runtime(model, fmt, folder, cases):
    """model exported as `fmt` into `folder`, run in its runtime on each of `cases`."""
    from convrewrite import export

    folder.mkdir(parents=True, exist_ok=True)
    run = export.load_runner(export.export_model(model, folder, fmt), fmt, n_outputs=1)
    return [run(x)[0] for x in cases]


def _runtime_original(fmt, tmp_path_factory):
    """(outputs in the runtime, Keras's eager outputs) of the ungrouped original on CASES, once per format."""
    if fmt not in _RUNTIME_ORIGINALS:
        original = _model(grouped=False)
        eager = [keras.ops.convert_to_numpy(original(x)) for x in CASES]
        _RUNTIME_ORIGINALS[fmt] = (_in_runtime(original, fmt, tmp_path_factory.mktemp(fmt), CASES), eager)
    return _RUNTIME_ORIGINALS[fmt]


def _skip_without(fmt):
    from convrewrite import export

    if export.missing_packages(fmt):
        pytest.skip(f"{fmt} needs {', '.join(export.missing_packages(fmt))} (pip install -e '.[export]')")


@pytest.mark.tensorflow_only("Keras writes these formats through TensorFlow's converters; one backend suffices")
@pytest.mark.parametrize("impl,fmt", RUNTIME_CELLS, ids=[f"{i}-{f}" for i, f in RUNTIME_CELLS])
def test_export_formats_an_implementation_claims_hold_in_their_runtime(impl, fmt, tmp_path, tmp_path_factory):
    """`Implementation.export_formats` is what a plan for a format may choose from: each claim is exported
    here, run in that runtime (OpenVINO at float32), and compared with the original exported and run the same
    way, on random inputs and on inputs with a NaN or an Inf (see `_same`). (The model leaves out the grouped
    conv: tf2onnx cannot convert Keras's, original or not.)"""
    _skip_without(fmt)
    fast = _forced(_model(grouped=False), impl)
    if fast is None:
        pytest.skip(f"{impl} applies to no site of the model")
    want, eager = _runtime_original(fmt, tmp_path_factory)
    for got, w, e in zip(_in_runtime(fast, fmt, tmp_path, CASES), want, eager):
        _same(got, w, e)


def _model_1d_3d(rank):
    """Conv1D sites (causal 15, depthwise 21 SAME, strided VALID 9) or Conv3D sites (SAME 5, VALID 3x5x7)."""
    if rank == 1:
        x = keras.Input((40, 4), batch_size=BATCH)
        y = keras.layers.Conv1D(6, 15, padding="causal")(x)
        y = keras.layers.DepthwiseConv1D(21, padding="same")(y)
        y = keras.layers.Conv1D(4, 9, strides=2)(y)
    else:
        x = keras.Input((8, 10, 12, 3), batch_size=BATCH)
        y = keras.layers.Conv3D(4, 5, padding="same")(keras.layers.Conv3D(3, (3, 5, 7))(x))
    model = keras.Model(x, y)
    rng = np.random.default_rng(rank)
    for w in model.weights:
        w.assign((rng.standard_normal(w.shape) / np.sqrt(max(np.prod(w.shape[:-1]), 1))).astype("float32"))
    return model


@pytest.mark.tensorflow_only("Keras writes these formats through TensorFlow's converters; one backend suffices")
@pytest.mark.parametrize("fmt", ["onnx", "openvino", "litert"])
@pytest.mark.parametrize("rank", [1, 3])
def test_the_1d_and_3d_fft_layers_hold_in_every_runtime(rank, fmt, tmp_path):
    """The `fft` claim covers the 1-D and 3-D FFT layers too: their real-arithmetic transforms and guard in
    each runtime, against the original there, with NaN and Inf inputs."""
    _skip_without(fmt)
    original = _model_1d_3d(rank)
    plan = convrewrite.plan(original, cost_model=None)
    for row in plan:
        plan.force(row.site, "fft")
    fast = convrewrite.optimize(original, plan=plan, check_speed=False)
    assert {row.choice for row in fast.convrewrite_plan} == {"fft"}
    rng = np.random.default_rng(5)
    cases = [rng.standard_normal((BATCH, *original.input_shape[1:])).astype("float32") for _ in range(3)]
    cases[1][0, 3], cases[2][0, 5] = np.nan, np.inf
    want = _in_runtime(original, fmt, tmp_path / "original", cases)
    for got, w, x in zip(_in_runtime(fast, fmt, tmp_path / "fast", cases), want, cases):
        _same(got, w, keras.ops.convert_to_numpy(original(x)))


@pytest.mark.parametrize("sizes,fft_shape", [((9,), (15,)), ((5, 7), (8, 12)), ((6, 6), (6, 6)), ((3, 4, 5), (4, 6, 7))])
def test_real_arithmetic_transforms_equal_numpy_ffts(sizes, fft_shape):
    """What the FFT layers compute for ONNX, OpenVINO and LiteRT (`layers/real_dft.py`) against numpy's FFTs,
    odd and even lengths, zero-padded and not: the forward pairs, the inverse, and a round trip."""
    from convrewrite.layers import real_dft

    x = np.random.default_rng(len(sizes)).standard_normal((2, 3, *sizes)).astype("float32")
    axes = tuple(range(2, 2 + len(sizes)))
    z = keras.ops.convert_to_numpy(real_dft.rdft(x, fft_shape))
    want = np.fft.rfftn(x.astype("float64"), s=fft_shape, axes=axes)
    assert rel_error(np.stack([z[..., 0, :], z[..., 1, :]]), np.stack([want.real, want.imag])) <= TOL
    back = keras.ops.convert_to_numpy(real_dft.irdft(z, fft_shape))
    assert rel_error(back, np.fft.irfftn(want, s=fft_shape, axes=axes)) <= TOL
    padded = np.zeros((2, 3, *fft_shape), "float32")
    padded[(slice(None), slice(None), *(slice(0, n) for n in sizes))] = x
    assert rel_error(back, padded) <= TOL


def test_an_openvino_export_declines_its_telemetry_for_the_conversion_alone(monkeypatch, tmp_path):
    """OpenVINO's converter sends usage telemetry unless CI=true: convrewrite's export sets it for the
    conversion and restores what the environment held (the suite itself runs with CI=true)."""
    import os

    from convrewrite import export

    model = _model(grouped=False)
    seen = []
    monkeypatch.setattr(model, "export", lambda path, format, verbose: seen.append((format, os.environ.get("CI"))))
    for before in ("false", None):
        if before is None:
            monkeypatch.delenv("CI")
        else:
            monkeypatch.setenv("CI", before)
        export.export_model(model, tmp_path, "openvino")
        assert os.environ.get("CI") == before
    export.export_model(model, tmp_path, "litert")
    assert seen == [("openvino", "true"), ("openvino", "true"), ("litert", None)]
