"""The backend operations convrewrite needs, behind one interface: one module per Keras backend, chosen at
import by `keras.backend.backend()`.

- `tensorflow_ops`: TensorFlow (tf.signal, tf.function, tf.custom_gradient, a tf.Variable spectrum cache);
- `jax_ops`: JAX (jnp.fft, jax.jit over the layers' variables, jax.custom_vjp; spectra are recomputed per
  call, see `jax_ops.cached_transform`).

Both export the same names with the same shapes and semantics (each function's docstring in
`tensorflow_ops` is the contract); nothing else in convrewrite imports tensorflow or jax directly, so the
layers use `keras.ops` plus this module only.
"""

from __future__ import annotations

import keras

from ...errors import UnsupportedBackendError

BACKEND = keras.backend.backend()
"""The Keras backend this process runs ("tensorflow" or "jax")."""

SUPPORTED_BACKENDS = ("tensorflow", "jax")

if BACKEND == "tensorflow":
    from .tensorflow_ops import *  # noqa: F401,F403
    from .tensorflow_ops import __all__ as _names
elif BACKEND == "jax":
    from .jax_ops import *  # noqa: F401,F403
    from .jax_ops import __all__ as _names
else:
    raise UnsupportedBackendError(
        f"convrewrite runs on Keras's {' or '.join(SUPPORTED_BACKENDS)} backend; found KERAS_BACKEND={BACKEND!r}: "
        f"set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax before importing keras.")

__all__ = ["BACKEND", "SUPPORTED_BACKENDS", *_names]
