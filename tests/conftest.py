import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# optimize()'s end-to-end speed check times both models for about a second per call: off for the suite,
# on where a test is about it (check_speed=True); tests/test_device.py tests it.
os.environ.setdefault("CONVREWRITE_CHECK_SPEED", "0")
# OpenVINO's converter starts telemetry unless it is declined; its converter declines where CI=true (it checks
# nothing else that writes no file). Its background sender forks processes that try the network: declined for the
# suite's process, which converts models to OpenVINO in tests/test_export.py.
os.environ.setdefault("CI", "true")
# a user cache of the suite's own (profiles measured by `auto`, tactic timings, calibrations), so that
# nothing the suite measures lands in ~/.cache and nothing from there changes what the suite sees.
if "CONVREWRITE_CACHE" not in os.environ:
    import tempfile

    os.environ["CONVREWRITE_CACHE"] = tempfile.mkdtemp(prefix="convrewrite-test-cache-")

import numpy as np
import pytest


def rel_error(actual, expected):
    """Normwise relative error: max |actual - expected| / max |expected| (0 when both are zero)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    err = np.max(np.abs(actual - expected)) if expected.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


@pytest.fixture
def rng(request):
    """A numpy Generator seeded per test (stable across runs, different between tests)."""
    seed = zlib.crc32(request.node.nodeid.encode())  # not hash(): Python salts str hashes per process
    return np.random.default_rng(seed)


# ---- backends ------------------------------------------------------------------------------------
# The suite runs on either Keras backend (KERAS_BACKEND=tensorflow, the default here, or jax). Tests of
# TensorFlow-only features (tf.train.Checkpoint, SavedModel export, graph functions with unknown sizes, the
# spectrum cache's variables) are marked `tensorflow_only` and skipped on other backends.
import keras  # noqa: E402

BACKEND = keras.backend.backend()


def pytest_report_header(config):
    """The device the suite believes it runs on (a simulated one under CONVREWRITE_SIMULATE_DEVICE)."""
    from convrewrite import device

    return f"convrewrite device: {device.describe(device.fingerprint())}"


def pytest_configure(config):
    config.addinivalue_line("markers", "tensorflow_only(reason): a TensorFlow-only feature; skipped on other backends")
    config.addinivalue_line("markers", "backend_agnostic(reason): logic no backend call changes (argument handling, "
                                       "file commits); run on TensorFlow only unless CONVREWRITE_ALL_BACKENDS_FULL=1")


# On the second backend the suite runs a representative subset by default, so that CI's two runs stay well
# under 30 minutes on 2 cores (JAX's eager dispatch and per-shape XLA compiles make each test several times
# slower than on TensorFlow): these modules run on TensorFlow only unless CONVREWRITE_ALL_BACKENDS_FULL=1.
SUBSET_ON_OTHER_BACKENDS = {
    "test_shapes.py": "size arithmetic in pure Python, no backend call",
    "test_reference.py": "the numpy oracle's own properties (its Keras comparisons also run in the layer tests)",
    "test_reference_range.py": "the numpy oracle's value ranges",
    "test_optimize_matrix.py": "the 86-cell optimize matrix (each implementation's JAX run is in its layer tests)",
    "test_pac_oracle.py": "PAC's 74 oracle cases (test_pac.py runs PAC on JAX)",
    "test_keras_hub.py": "the keras-hub zoo (test_applications.py converts Keras applications on JAX)",
}
ALL_BACKENDS_FULL = os.environ.get("CONVREWRITE_ALL_BACKENDS_FULL", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    for item in items:
        marker = item.get_closest_marker("tensorflow_only")
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        if marker is not None:
            why = marker.args[0] if marker.args else "a TensorFlow-only feature"
            item.add_marker(pytest.mark.skip(reason=f"TensorFlow backend only ({why})"))
        elif item.get_closest_marker("backend_agnostic") is not None and not ALL_BACKENDS_FULL:
            why = item.get_closest_marker("backend_agnostic").args[0]
            item.add_marker(pytest.mark.skip(reason=f"run on TensorFlow ({why}); CONVREWRITE_ALL_BACKENDS_FULL=1 "
                                                    f"runs it on {BACKEND} too"))
        elif module in SUBSET_ON_OTHER_BACKENDS and not ALL_BACKENDS_FULL:
            item.add_marker(pytest.mark.skip(reason=f"run on TensorFlow ({SUBSET_ON_OTHER_BACKENDS[module]}); "
                                                    f"CONVREWRITE_ALL_BACKENDS_FULL=1 runs it on {BACKEND} too"))


def gradients(fn, x, variables=()):
    """[d sum(fn(x)) / d x, *(d sum(fn(x)) / d v for v in variables)] on the active backend (fn's output
    weighted by whatever fn multiplies it with); x may be a tuple of arrays (its gradient is then a tuple)."""
    from convrewrite.layers import backend

    return backend.forward_backward(fn, keras.tree.map_structure(keras.ops.convert_to_tensor, x), list(variables))


def host_sleep(y, seconds):
    """y, after the host has slept `seconds` inside the (possibly compiled) computation: a deliberately slow
    op for speed-check tests (tf.numpy_function / jax.pure_callback)."""
    import time

    def sleep(a):
        time.sleep(seconds)
        return a

    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.numpy_function(sleep, [y], y.dtype, stateful=True)
    import jax

    return jax.pure_callback(sleep, jax.ShapeDtypeStruct(y.shape, y.dtype), y)


def random_cases(n: int) -> int:
    """How many of a randomized test's n seeded cases run: all on TensorFlow, the first quarter on another
    backend (the same seeds: a prefix of TensorFlow's cases) unless CONVREWRITE_ALL_BACKENDS_FULL=1. (A
    quarter, not half: each JAX case compiles its own XLA computations, and CI runs both backends.)"""
    return n if BACKEND == "tensorflow" or ALL_BACKENDS_FULL else max(1, n // 4)


def with_native_bf16(fp: dict, native: bool) -> dict:
    """A copy of fingerprint `fp` whose device has (or lacks) native bfloat16, whatever device it is: on a CPU
    through its ISA flags (avx512_bf16 / amx_bf16), on a GPU through its compute capability (8.0 / 7.5)."""
    import copy

    fp = copy.deepcopy(fp)
    if fp.get("device_kind") == "gpu":
        fp["compute_capability"] = [8, 0] if native else [7, 5]
    else:
        isa = set(fp["hardware"]["cpu"]["isa"]) - {"avx512_bf16", "amx_bf16"}
        fp["hardware"]["cpu"]["isa"] = sorted(isa | ({"avx512_bf16"} if native else set()))
    return fp
