import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# optimize()'s end-to-end speed check times both models for about a second per call: off for the suite,
# on where a test is about it (check_speed=True); tests/test_device.py tests it.
os.environ.setdefault("CONVREWRITE_CHECK_SPEED", "0")
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


def pytest_configure(config):
    config.addinivalue_line("markers", "tensorflow_only(reason): a TensorFlow-only feature; skipped on other backends")


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    for item in items:
        marker = item.get_closest_marker("tensorflow_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "a TensorFlow-only feature"
            item.add_marker(pytest.mark.skip(reason=f"TensorFlow backend only ({why})"))


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
